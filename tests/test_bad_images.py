"""Bad input: damaged images, non-images and bad mountpoints.

Where the damage is in what `scratchfs mount` reads (superblock, id and fragment tables, the
root inode, table offsets), the command must refuse with ONE line on stderr, a non-zero exit
(4, "bad image", for image damage) and no traceback, and leave nothing mounted.  Where the
damage is found later (data blocks, fragment blocks, inode or directory metadata past the root),
the mount comes up; reading a damaged file fails with EIO, every other file reads exactly as in
the undamaged image, and the mount stays up.  Damage is aimed with `imagegen`'s structure
locators at gzip images, whose blocks carry a checksum, so corruption is certain to be detectable
(an uncompressed block with flipped bytes is indistinguishable from real data).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import imagegen, mounts
from tests.imagegen import KiB, set_superblock_field

pytestmark = pytest.mark.mount
BS = 128 * KiB


# ------------------------------------------------------------------------------------ images

def _mk(src: Path, out: Path, *extra: str) -> bytes:
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress", "-comp", "gzip",
                    "-b", str(BS), *extra], check=True, capture_output=True)  # fmt: skip
    return out.read_bytes()


@pytest.fixture(scope="module")
def data_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A victim file of 4 compressible blocks, 40 small files in two fragment blocks, others."""
    base = tmp_path_factory.mktemp("bad-data")
    src = base / "src"
    (src / "frag").mkdir(parents=True)
    (src / "victim").write_bytes(imagegen.text_bytes(3 * BS + 500, 1))
    (src / "other_text").write_bytes(imagegen.text_bytes(2 * BS + 77, 2))
    (src / "other_rand").write_bytes(imagegen.random_bytes(2 * BS + 5, 3))
    for i in range(40):
        (src / "frag" / f"f{i:02d}").write_bytes(imagegen.text_bytes(5000 + i, 100 + i))
        os.chown(src / "frag" / f"f{i:02d}", 1000 + 7 * i, 2000 + i)  # enough ids for a compressed id block
    os.symlink("victim", src / "link")
    os.setxattr(src / "other_text", b"user.k", b"v")
    return base / "pristine.sqfs", _mk(src, base / "pristine.sqfs")


@pytest.fixture(scope="module")
def meta_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """3,000 files in 30 directories: inode and directory tables span many metadata blocks."""
    base = tmp_path_factory.mktemp("bad-meta")
    src = base / "src"
    for d in range(30):
        (src / f"d{d:02d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d:02d}" / f"file_{i:03d}").write_bytes(b"%d/%d\n" % (d, i))
    (src / "big").write_bytes(imagegen.text_bytes(BS + 10, 9))
    os.setxattr(src / "big", b"user.k", b"v")  # with an xattr table, as in test_data_image
    return base / "pristine.sqfs", _mk(src, base / "pristine.sqfs")


@pytest.fixture(scope="module")
def pristine_data(data_image: tuple[Path, bytes], need_mounts: None,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, mounts.Entry]:  # fmt: skip
    with mounts.kernel_mount(data_image[0], tmp_path_factory.mktemp("k") / "m") as k:
        return mounts.snapshot(k)


@pytest.fixture(scope="module")
def pristine_meta(meta_image: tuple[Path, bytes], need_mounts: None,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, mounts.Entry]:  # fmt: skip
    with mounts.kernel_mount(meta_image[0], tmp_path_factory.mktemp("k") / "m") as k:
        return mounts.snapshot(k)


def rdstat(image: Path, path: str) -> dict[str, str]:
    out = subprocess.run(["rdsquashfs", "-s", path, str(image)], check=True, capture_output=True, text=True).stdout
    info: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        info[key] = value.strip()
    return info


def scramble(data: bytearray, start: int, end: int, seed: int, count: int = 16) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        pos = rng.randrange(start, end)
        data[pos] ^= rng.randrange(1, 256)


def corrupt_meta_block(data: bytearray, block: imagegen.MetaBlock, seed: int) -> None:
    """Flip bytes inside a gzip metadata block's payload until zlib rejects it."""
    assert block.compressed
    for s in range(seed, seed + 100):
        trial = bytearray(data)
        scramble(trial, block.offset + 2 + block.size // 4, block.offset + 2 + block.size * 3 // 4, s)
        try:
            zlib.decompress(bytes(trial[block.payload]))
        except zlib.error:
            data[:] = trial
            return
    raise AssertionError("could not make the block undecodable")


# ---------------------------------------------------------------------------------- helpers

def assert_refused(res: subprocess.CompletedProcess[str], mountpoint: Path, code: int | None = None) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, f"mount succeeded; stderr: {res.stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {res.stderr!r}"
    assert "Traceback" not in res.stderr and "Error:" not in lines[0].split("error:", 1)[0]
    if code is not None:
        assert res.returncode == code, f"exit {res.returncode}, expected {code}: {lines[0]}"
    assert not mounts.is_mounted(mountpoint), "a refused mount left something mounted"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield mp
    if mounts.is_mounted(mp):
        mounts.unmount(mp)


def try_mount(image: Path, mp: Path) -> subprocess.CompletedProcess[str]:
    return mounts.run_scratchfs("mount", str(image), str(mp), "--log", str(mp.with_name("log")))


def warnings(m: mounts.FuseMount) -> list[str]:
    return [line for line in m.log_text().splitlines() if " WARNING " in line or " ERROR " in line]


def read_all(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------- refused at mount time

Damage = Callable[[bytearray, dict[str, int]], None]


def _truncate(n: Callable[[dict[str, int]], int]) -> Damage:
    def f(d: bytearray, sb: dict[str, int]) -> None:
        del d[n(sb):]
    return f


def _field(name: str, value: Callable[[dict[str, int], int], int]) -> Damage:
    def f(d: bytearray, sb: dict[str, int]) -> None:
        set_superblock_field(d, name, value(sb, len(d)))
    return f


def _id_block(d: bytearray, sb: dict[str, int]) -> None:
    ptr = int.from_bytes(d[sb["id_table_start"]:sb["id_table_start"] + 8], "little")
    blk = imagegen.metadata_blocks(d, ptr, sb["id_table_start"])[0]
    corrupt_meta_block(d, blk, 1)


def _id_pointer(d: bytearray, sb: dict[str, int]) -> None:
    d[sb["id_table_start"]:sb["id_table_start"] + 8] = (len(d) + 10 * BS).to_bytes(8, "little")


def _frag_pointer(d: bytearray, sb: dict[str, int]) -> None:
    d[sb["fragment_table_start"]:sb["fragment_table_start"] + 8] = (len(d) + 10 * BS).to_bytes(8, "little")


def _frag_table_block(d: bytearray, sb: dict[str, int]) -> None:
    ptr = int.from_bytes(d[sb["fragment_table_start"]:sb["fragment_table_start"] + 8], "little")
    corrupt_meta_block(d, imagegen.metadata_blocks(d, ptr, ptr + 2 + 8192)[0], 2)


def _root_inode_block(d: bytearray, sb: dict[str, int]) -> None:
    block, _ = imagegen.root_inode_location(bytes(d))
    corrupt_meta_block(d, block, 3)


def _magic_off_by_one(d: bytearray, sb: dict[str, int]) -> None:
    d[0] ^= 1


REFUSED: dict[str, Damage] = {
    "truncated-0": _truncate(lambda sb: 0),
    "truncated-10": _truncate(lambda sb: 10),
    "truncated-95": _truncate(lambda sb: 95),
    "truncated-96": _truncate(lambda sb: 96),
    "truncated-4096": _truncate(lambda sb: 4096),
    "truncated-half": _truncate(lambda sb: sb["bytes_used"] // 2),
    "truncated-at-inode-table": _truncate(lambda sb: sb["inode_table_start"]),
    "truncated-at-id-table": _truncate(lambda sb: sb["id_table_start"]),
    "truncated-last-byte": _truncate(lambda sb: sb["bytes_used"] - 1),
    "magic": _magic_off_by_one,
    "version-3": _field("version_major", lambda sb, n: 3),
    "version-5": _field("version_major", lambda sb, n: 5),
    "compressor-99": _field("compression", lambda sb, n: 99),
    "compressor-0": _field("compression", lambda sb, n: 0),
    "block-size-0": _field("block_size", lambda sb, n: 0),
    "block-size-3": _field("block_size", lambda sb, n: 3),
    "block-size-2m": _field("block_size", lambda sb, n: 2 << 20),
    "block-size-1g": _field("block_size", lambda sb, n: 1 << 30),
    "block-log-mismatch": _field("block_log", lambda sb, n: 16),
    "inode-count-0": _field("inode_count", lambda sb, n: 0),
    "inode-count-max": _field("inode_count", lambda sb, n: 2**32 - 1),
    "id-count-0": _field("id_count", lambda sb, n: 0),
    "id-count-max": _field("id_count", lambda sb, n: 0xFFFF),
    "bytes-used-beyond-eof": _field("bytes_used", lambda sb, n: n + 1),
    "bytes-used-2^63": _field("bytes_used", lambda sb, n: 2**63),
    "root-inode-beyond-table": _field("root_inode", lambda sb, n: (sb["directory_table_start"] << 16)),
    **{f"{t}-beyond-eof": _field(t, lambda sb, n: n + 4096)
       for t in ("id_table_start", "inode_table_start", "directory_table_start", "fragment_table_start",
                 "export_table_start", "xattr_id_table_start")},  # fmt: skip
    "inode-after-directory-table": _field("inode_table_start", lambda sb, n: sb["directory_table_start"] + 2),
    "id-table-pointer-beyond-eof": _id_pointer,
    "id-table-block-corrupt": _id_block,
    "fragment-table-pointer-beyond-eof": _frag_pointer,
    "fragment-table-block-corrupt": _frag_table_block,
    "root-inode-block-corrupt": _root_inode_block,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_damage_in_what_mount_reads_is_refused(case: str, data_image: tuple[Path, bytes], need_mounts: None,
                                               mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    pristine = data_image[1]
    sb = imagegen.read_superblock(pristine)
    assert sb["xattr_id_table_start"] != imagegen.NO_TABLE and sb["export_table_start"] != imagegen.NO_TABLE
    damaged = bytearray(pristine)
    REFUSED[case](damaged, sb)
    assert damaged != pristine
    image = tmp_path / f"{case}.sqfs"
    image.write_bytes(damaged)
    assert_refused(try_mount(image, mountpoint), mountpoint, code=4)


@pytest.mark.parametrize("seed", range(8))
def test_random_superblock_corruption(seed: int, data_image: tuple[Path, bytes], need_mounts: None,
                                      pristine_data: dict[bytes, mounts.Entry],
                                      mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    """1-3 random bytes of the superblock changed: a one-line refusal, or a mount that serves
    nothing but the undamaged image's data (or EIO) and stays up."""
    rng = random.Random(seed)
    damaged = bytearray(data_image[1])
    spots = sorted(rng.sample(range(4, imagegen.SUPERBLOCK_SIZE), rng.randint(1, 3)))  # magic: see REFUSED
    for p in spots:
        damaged[p] ^= rng.randrange(1, 256)
    changed = [f for f in imagegen.SUPERBLOCK_FIELDS
               if imagegen.read_superblock(bytes(damaged))[f] != imagegen.read_superblock(data_image[1])[f]]  # fmt: skip
    image = tmp_path / "sb.sqfs"
    image.write_bytes(damaged)
    res = try_mount(image, mountpoint)
    if res.returncode != 0:
        assert_refused(res, mountpoint, code=4)
        return
    m = mounts.FuseMount(mountpoint, mountpoint.with_name("log"))
    try:
        check_degraded(m, pristine_data, None)
    except AssertionError as e:
        raise AssertionError(f"superblock fields {changed} changed (bytes {spots}): {e}") from None
    finally:
        mounts.unmount(mountpoint)


def test_truncated_to_bytes_used_still_mounts(data_image: tuple[Path, bytes], pristine_data: dict[bytes, mounts.Entry],
                                              mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    """Cutting only the padding after bytes_used is not damage (the refusals above are not blanket)."""
    sb = imagegen.read_superblock(data_image[1])
    image = tmp_path / "exact.sqfs"
    image.write_bytes(data_image[1][:sb["bytes_used"]])
    with mounts.scratchfs_mount(image, mountpoint) as m:
        assert mounts.diff(pristine_data, mounts.snapshot(m.path)) == []


@pytest.mark.parametrize("kind", ["random", "empty", "text", "elf", "gzip"])
def test_not_squashfs(kind: str, need_mounts: None, mountpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "notsquashfs"
    if kind == "random":
        image.write_bytes(random.Random(5).randbytes(1 << 20))
    elif kind == "empty":
        image.write_bytes(b"")
    elif kind == "text":
        image.write_text("hsq is not hsqs\n" * 1000)
    elif kind == "elf":
        shutil.copyfile("/bin/true", image)
    else:
        image.write_bytes(zlib.compress(b"x" * 100000))
    assert_refused(try_mount(image, mountpoint), mountpoint, code=4)


# --------------------------------------------------------------------- damage found later

def check_degraded(m: mounts.FuseMount, pristine: dict[bytes, mounts.Entry], expect_broken: set[bytes] | None) -> set[bytes]:
    """Tolerant snapshot: every path equals the pristine one or fails with EIO; returns the failures."""
    got = mounts.snapshot(m.path, tolerant=True)
    broken: set[bytes] = set()
    problems: list[str] = []
    for path, ent in got.items():
        errs = ent.errors
        if errs:
            broken.add(path)
            if not all(e.endswith(":EIO") for e in errs):
                problems.append(f"{path!r}: failed with {errs}, expected EIO")
            continue
        if path not in pristine:
            problems.append(f"{path!r}: not in the undamaged image ({ent.type})")
            continue
        for line in mounts.diff({path: pristine[path]}, {path: ent}):
            problems.append(line)
    if expect_broken is not None:
        for path in sorted(expect_broken - broken):
            problems.append(f"{path!r}: damaged but read without error")
        for path in sorted(broken - expect_broken):
            problems.append(f"{path!r}: undamaged but failed")
    assert not problems, "\n".join(problems[:40])
    assert mounts.is_mounted(m.path), "the mount went down"
    os.statvfs(m.path)
    assert "Traceback" not in m.log_text(), "an expected error was logged as a crash"
    return broken


def test_corrupt_data_block_gives_eio_on_that_file_only(data_image: tuple[Path, bytes], need_mounts: None,
                                                       pristine_data: dict[bytes, mounts.Entry],
                                                       mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    info = rdstat(data_image[0], "victim")
    start = int(info["Blocks start"])
    b0 = int(info["Block #0 size"].split()[0])
    b1 = int(info["Block #1 size"].split()[0])
    assert "(compressed)" in info["Block #1 size"]
    damaged = bytearray(data_image[1])
    scramble(damaged, start + b0 + b1 // 4, start + b0 + b1 * 3 // 4, 7)
    image = tmp_path / "data.sqfs"
    image.write_bytes(damaged)
    with mounts.scratchfs_mount(image, mountpoint) as m:
        victim = os.path.join(os.fsencode(m.path), b"victim")
        for attempt in range(2):  # the second read must fail the same way, not hang or serve garbage
            with pytest.raises(OSError) as exc:
                read_all(victim)
            assert exc.value.errno == errno.EIO, (attempt, exc.value)
        assert os.stat(victim).st_size == pristine_data[b"victim"].size
        check_degraded(m, pristine_data, {b"victim"})
        assert len(warnings(m)) == 1, "the damaged file is not logged exactly once:\n" + "\n".join(warnings(m))


def test_corrupt_fragment_block_gives_eio_on_its_files_only(data_image: tuple[Path, bytes], need_mounts: None,
                                                           pristine_data: dict[bytes, mounts.Entry],
                                                           mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    frags = imagegen.fragment_table(data_image[1])
    assert len(frags) >= 2
    index = next(i for i, (_, size) in enumerate(frags) if not size & (1 << 24))  # a compressed one
    members = {b"frag/" + name.encode() for name in sorted(os.listdir(data_image[0].parent / "src" / "frag"))
               if int(rdstat(data_image[0], f"frag/{name}")["Fragment index"], 16) == index}  # fmt: skip
    assert members and len(members) < 40
    start, size = frags[index]
    damaged = bytearray(data_image[1])
    scramble(damaged, start + size // 4, start + size * 3 // 4, 11)
    image = tmp_path / "frag.sqfs"
    image.write_bytes(damaged)
    with mounts.scratchfs_mount(image, mountpoint) as m:
        for member in members:
            with pytest.raises(OSError) as exc:
                read_all(os.path.join(os.fsencode(m.path), member))
            assert exc.value.errno == errno.EIO, (member, exc.value)
        check_degraded(m, pristine_data, members)  # reads every file again
        assert len(warnings(m)) == len(members), "each damaged file must be logged exactly once:\n" + \
            "\n".join(warnings(m))


@pytest.mark.parametrize("which", ["inode-table", "directory-table"])
@pytest.mark.parametrize("nth", [0, 2, 4])
def test_corrupt_metadata_block_found_later(which: str, nth: int, meta_image: tuple[Path, bytes], need_mounts: None,
                                            pristine_meta: dict[bytes, mounts.Entry],
                                            mountpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    """A damaged inode/directory block other than the root's: refused, or served like the kernel.

    Every path of the undamaged image is looked up directly on both mounts of the damaged image:
    scratchfs must never serve anything that differs from the undamaged image, must fail only
    with EIO, and must serve every path (and list every directory) that the kernel still serves.
    """
    data = meta_image[1]
    sb = imagegen.read_superblock(data)
    root_block, root_dir_block = imagegen.root_inode_location(data)
    if which == "inode-table":
        blocks = [b for b in imagegen.metadata_blocks(data, sb["inode_table_start"], sb["directory_table_start"])
                  if b != root_block and b.compressed]  # fmt: skip
    else:
        blocks = [b for b in imagegen.metadata_blocks(data, sb["directory_table_start"], sb["fragment_table_start"])
                  if b.offset - sb["directory_table_start"] != root_dir_block and b.compressed]  # fmt: skip
    assert len(blocks) > nth
    damaged = bytearray(data)
    corrupt_meta_block(damaged, blocks[nth], 100 + nth)
    image = tmp_path / "meta.sqfs"
    image.write_bytes(damaged)
    res = try_mount(image, mountpoint)
    if res.returncode != 0:
        assert_refused(res, mountpoint, code=4)
        return
    paths = sorted(pristine_meta)
    try:
        with mounts.kernel_mount(image, tmp_path / "kernel") as k:
            kernel = mounts.probe(k, paths)
        fuse = mounts.probe(mountpoint, paths)
        assert mounts.is_mounted(mountpoint), "the mount went down"
        log = mountpoint.with_name("log").read_text(errors="replace")
    finally:
        mounts.unmount(mountpoint)
    listings: dict[bytes, list[bytes]] = {p: [] for p, e in pristine_meta.items() if e.type == "dir"}
    for p in paths:
        if p:
            listings[os.path.dirname(p)].append(os.path.basename(p))
    problems: list[str] = []
    for path in paths:
        (ke, kl), (fe, fl) = kernel[path], fuse[path]
        want, want_list = pristine_meta[path], sorted(listings.get(path, []))
        kernel_good = not ke.errors and ke == want and (kl is None or kl == want_list)
        if fe.errors and not all(e.endswith(":EIO") for e in fe.errors):
            problems.append(f"{path!r}: failed with {fe.errors}, expected EIO")
        if not any(e.startswith("lstat") for e in fe.errors) and fe != want:
            problems += [f"wrong data served: {line}" for line in mounts.diff({path: want}, {path: fe})]
        if fl is not None and fl != want_list:
            problems.append(f"{path!r}: wrong listing served: {len(fl)} names, the undamaged image has {len(want_list)}")
        if kernel_good and fe.errors:
            problems.append(f"{path!r}: the kernel serves it correctly, scratchfs fails with {fe.errors}")
    assert any(ke.errors for ke, _ in kernel.values()) or any(fe.errors for fe, _ in fuse.values()), \
        "the damaged block was never noticed"
    assert not problems, f"{which} block {nth} damaged:\n" + "\n".join(problems[:30]) + \
        (f"\n... {len(problems) - 30} more" if len(problems) > 30 else "")
    assert "Traceback" not in log


# ------------------------------------------------------------------------- bad mountpoints

def test_mountpoint_not_empty(data_image: tuple[Path, bytes], need_mounts: None, mountpoint: Path) -> None:
    (mountpoint / "something").write_text("x")
    assert_refused(try_mount(data_image[0], mountpoint), mountpoint)


def test_mountpoint_missing(data_image: tuple[Path, bytes], need_mounts: None, tmp_path: Path) -> None:
    mp = tmp_path / "missing"
    assert_refused(try_mount(data_image[0], mp), mp, code=3)
    assert not mp.exists()


def test_mountpoint_already_mounted(data_image: tuple[Path, bytes], need_mounts: None, mountpoint: Path) -> None:
    with mounts.scratchfs_mount(data_image[0], mountpoint) as m:
        res = try_mount(data_image[0], mountpoint)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 5 and len(lines) == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
        assert os.path.exists(os.path.join(m.path, "victim")), "the existing mount was disturbed"


def test_mountpoint_is_kernel_mount(data_image: tuple[Path, bytes], need_mounts: None, mountpoint: Path) -> None:
    with mounts.kernel_mount(data_image[0], mountpoint):
        res = try_mount(data_image[0], mountpoint)
        assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_image_missing(need_mounts: None, mountpoint: Path, tmp_path: Path) -> None:
    assert_refused(try_mount(tmp_path / "no-such.sqfs", mountpoint), mountpoint, code=3)


def test_image_is_a_directory(need_mounts: None, mountpoint: Path, tmp_path: Path) -> None:
    assert_refused(try_mount(tmp_path, mountpoint), mountpoint)
