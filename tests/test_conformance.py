"""Conformance of the read path: the kernel's squashfs driver is the oracle.

Every image of `imagegen.MATRIX` is mounted with `mount -t squashfs -o loop,ro` and with
`scratchfs mount`; the two trees must agree on every path and field, on reads at odd offsets and
lengths, on readdir of a 20,000-entry directory, and statfs must describe a read-only image.
The reader alone (no FUSE) is compared with the kernel mount for one image as well.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import imagegen, mounts
from tests.conftest import ImageCache
from tests.imagegen import MATRIX, ImageSpec
from tests.mounts import Entry

pytestmark = pytest.mark.mount


@dataclass
class Pair:
    spec: ImageSpec
    image: Path
    kernel: Path
    fuse: mounts.FuseMount
    _snaps: dict[str, dict[bytes, Entry]] = field(default_factory=dict)

    def kernel_snapshot(self) -> dict[bytes, Entry]:
        if "k" not in self._snaps:
            self._snaps["k"] = mounts.snapshot(self.kernel)
        return self._snaps["k"]


@pytest.fixture(scope="module", params=MATRIX, ids=str)
def pair(request: pytest.FixtureRequest, images: ImageCache, need_mounts: None,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:  # fmt: skip
    spec: ImageSpec = request.param
    image = images.image(spec)
    base = tmp_path_factory.mktemp("mnt-" + spec.name)
    with mounts.kernel_mount(image, base / "kernel") as k, mounts.scratchfs_mount(image, base / "fuse") as f:
        yield Pair(spec, image, k, f)


def test_tree_matches_kernel(pair: Pair) -> None:
    """Every path: type, mode, uid, gid, size, nlink, mtime, rdev, target, xattrs, content, hard links."""
    expected = pair.kernel_snapshot()
    got = mounts.snapshot(pair.fuse.path)
    problems = mounts.diff(expected, got)
    problems += mounts.compare_large_files(pair.kernel, pair.fuse.path, expected)
    assert not problems, f"{pair.spec}: scratchfs differs from the kernel mount:\n" + "\n".join(problems)
    assert "Traceback" not in pair.fuse.log_text()


def test_image_has_every_feature(pair: Pair) -> None:
    """The oracle's own view of the image holds every feature, so the comparison is not vacuous."""
    snap = pair.kernel_snapshot()
    types = {e.type for e in snap.values()}
    assert {"file", "dir", "symlink", "fifo", "chr", "blk", "socket"} <= types
    assert len([p for p in snap if p.startswith(b"big/")]) == pair.spec.big_dir + 3
    assert any(p.count(b"/") > imagegen.DEEP_LEVELS for p in snap)
    assert snap[b"empty_file"].size == 0 and snap[b"empty_dir"].type == "dir"
    assert len(snap[b"links/target_4095"].target or b"") == 4095
    assert snap[b"links/dangling"].target == b"does/not/exist"
    if pair.spec.builder != "gensquashfs-packfile":  # see imagegen.write_pack_file
        assert any(e.xattrs and b"trusted.t" in e.xattrs for e in snap.values())
        assert any(e.xattrs and b"security.s" in e.xattrs for e in snap.values())
        assert any(e.xattrs and b"trusted.onlink" in e.xattrs for e in snap.values())
    assert len({e.uid for e in snap.values()}) > 2048  # id table spans several metadata blocks
    assert any(e.mode & stat.S_ISUID for e in snap.values()) and any(e.mode & stat.S_ISVTX for e in snap.values())
    assert snap[b"special/chr_big"].rdev == os.makedev(4095, 1048575)
    if pair.spec.builder != "gensquashfs":  # gensquashfs --pack-dir does not keep hard links
        assert mounts.hardlink_groups(snap)
    if pair.spec.builder != "gensquashfs-packfile":  # a pack file cannot name these
        assert b"names/" + b"\xff" * 255 in snap and b"names/" + b"n" * 255 in snap
    if pair.spec.tree == "full+big":
        assert snap[b"sparse/big_over_4g"].size == imagegen.BIG_SPARSE_SIZE


# ----------------------------------------------------------------------------- odd-offset reads

def probe_points(size: int, bs: int) -> list[tuple[int, int]]:
    """(offset, length) pairs straddling block boundaries, the fragment tail and EOF."""
    tail = size - size % bs  # first byte of the tail (fragment, or short last block)
    offsets = {0, 1, bs - 1, bs, bs + 1, 2 * bs - 1, 2 * bs, 2 * bs + 1, tail - 1, tail, tail + 1,
               size - 1, size, size + 1, size + bs + 7, 4095, 4096, 4097}  # fmt: skip
    lengths = [1, 2, 3, 4095, 4097, bs - 1, bs + 1, 2 * bs + 3]
    return [(o, n) for o in sorted(offsets) if o >= 0 for n in lengths]


def _probe_files(pair: Pair) -> list[bytes]:
    snap = pair.kernel_snapshot()
    return [p for p, e in snap.items() if e.type == "file" and p.split(b"/")[0] in (b"data", b"sparse", b"links")]


def test_odd_offset_reads(pair: Pair) -> None:
    """pread at odd offsets/lengths, buffered and O_DIRECT (which reaches the daemon unaligned)."""
    bs = pair.spec.block_size
    problems: list[str] = []
    snap = pair.kernel_snapshot()
    for rel in _probe_files(pair):
        size = snap[rel].size
        points = probe_points(size, bs)
        if size > 2**32:
            points += [(o, n) for o in (2**32 - 5, 2**32 - 1, 2**32, 2**32 + 1, 3 * imagegen.GiB + 70,
                                         size - 5, size - bs - 1) for n in (1, 9, 4097, bs + 1)]  # fmt: skip
        kfd = os.open(os.path.join(os.fsencode(pair.kernel), rel), os.O_RDONLY)
        ffd = os.open(os.path.join(os.fsencode(pair.fuse.path), rel), os.O_RDONLY)
        dfd = os.open(os.path.join(os.fsencode(pair.fuse.path), rel), os.O_RDONLY | os.O_DIRECT)
        try:
            for off, n in points:
                want = os.pread(kfd, n, off)
                for how, fd in (("buffered", ffd), ("O_DIRECT", dfd)):
                    got = os.pread(fd, n, off)
                    if got != want:
                        problems.append(f"{rel!r} {how} pread(off={off}, len={n}): expected {len(want)} bytes "
                                        f"sha256 {hashlib.sha256(want).hexdigest()[:12]}, got {len(got)} bytes "
                                        f"sha256 {hashlib.sha256(got).hexdigest()[:12]}")  # fmt: skip
        finally:
            for fd in (kfd, ffd, dfd):
                os.close(fd)
        if len(problems) > 40:
            break
    assert not problems, f"{pair.spec} (block size {bs}):\n" + "\n".join(problems[:40])


def test_readdir_of_big_directory(pair: Pair) -> None:
    """20,000 entries in three images (see MATRIX), 3,000 in the others."""
    kdir = pair.kernel / "big"
    fdir = pair.fuse.path / "big"
    with os.scandir(os.fsencode(kdir)) as it:
        want = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in it}
    with os.scandir(os.fsencode(fdir)) as it:
        listing = [(e.name, (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))) for e in it]
    names = [n for n, _ in listing]
    assert len(names) == len(set(names)), "readdir returned duplicate names"
    assert len(want) == pair.spec.big_dir + 3
    missing, extra = want.keys() - set(names), set(names) - want.keys()
    assert not missing and not extra, f"missing {sorted(missing)[:10]}, extra {sorted(extra)[:10]}"
    wrong_type = [n for n, t in listing if want[n] != t]
    assert not wrong_type, f"d_type differs for {wrong_type[:10]}"


def test_statfs(pair: Pair) -> None:
    k = os.statvfs(pair.kernel)
    f = os.statvfs(pair.fuse.path)
    sb = imagegen.read_superblock(pair.image)
    assert f.f_flag & os.ST_RDONLY, "the mount is not read-only"
    assert f.f_bfree == 0 and f.f_bavail == 0, (f.f_bfree, f.f_bavail)
    assert f.f_files == k.f_files == sb["inode_count"], (f.f_files, k.f_files, sb["inode_count"])
    assert f.f_namemax >= 255, f.f_namemax
    total = f.f_blocks * f.f_frsize
    assert abs(total - sb["bytes_used"]) < max(f.f_frsize, f.f_bsize), (total, sb["bytes_used"])


# --------------------------------------------------------------------------- the reader alone

def _reader_snapshot(img: object, big_compare: Path) -> tuple[dict[bytes, Entry], list[str]]:
    from scratchfs.squashfs import Image

    assert isinstance(img, Image)
    out: dict[bytes, Entry] = {}
    problems: list[str] = []
    for path, ino in img.walk():
        ent = Entry(mounts.type_name(ino.mode), ino.mode, ino.uid, ino.gid, ino.size, ino.nlink,
                    ino.mtime * 1_000_000_000, ino.rdev, ino=ino.ino)  # fmt: skip
        ent.xattrs = img.xattrs(ino)
        if ino.is_symlink:
            ent.target = img.readlink(ino)
        elif ino.is_file:
            if ino.size > mounts.LARGE_FILE:
                ent.sha256 = "large"
                with open(os.path.join(os.fsencode(big_compare), path), "rb", buffering=0) as f:
                    for off in range(0, ino.size, 8 * mounts.CHUNK):
                        if img.read(ino, off, 8 * mounts.CHUNK) != f.read(8 * mounts.CHUNK):
                            problems.append(f"{path!r}: reader content differs in [{off}, +8 MiB)")
                            break
            else:
                h = hashlib.sha256()
                for off in range(0, ino.size, mounts.CHUNK):
                    h.update(img.read(ino, off, mounts.CHUNK))
                ent.sha256 = h.hexdigest()
        out[path] = ent
    return out, problems


@pytest.fixture(scope="module")
def kernel_only(images: ImageCache, need_mounts: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    spec = MATRIX[0]
    image = images.image(spec)
    base = tmp_path_factory.mktemp("reader-" + spec.name)
    with mounts.kernel_mount(image, base / "kernel") as k:
        yield Pair(spec, image, k, mounts.FuseMount(Path("/nonexistent"), Path("/nonexistent")))


def test_reader_walk_and_read_match_kernel(kernel_only: Pair) -> None:
    from scratchfs.squashfs import Image

    expected = kernel_only.kernel_snapshot()
    with Image.open(kernel_only.image) as img:
        got, problems = _reader_snapshot(img, kernel_only.kernel)
    problems += mounts.diff(expected, got)
    assert not problems, f"{kernel_only.spec}: reader differs from the kernel mount:\n" + "\n".join(problems)


def test_reader_odd_offsets_match_kernel(kernel_only: Pair) -> None:
    from scratchfs.squashfs import Image

    bs = kernel_only.spec.block_size
    snap = kernel_only.kernel_snapshot()
    problems = []
    with Image.open(kernel_only.image) as img:
        assert img.info.block_size == bs
        for rel in _probe_files(kernel_only):
            ino = img.root
            for part in rel.split(b"/"):
                found = img.lookup(ino, part)
                assert found is not None, f"lookup of {part!r} in {rel!r} failed"
                ino = found
            assert ino.size == snap[rel].size
            with open(os.path.join(os.fsencode(kernel_only.kernel), rel), "rb", buffering=0) as f:
                for off, n in probe_points(ino.size, bs):
                    f.seek(off)
                    want = f.read(n)
                    got = img.read(ino, off, n)
                    if got != want:
                        problems.append(f"{rel!r} read(off={off}, size={n}): expected {len(want)} bytes, got {len(got)}"
                                        f"{' (same length, different bytes)' if len(got) == len(want) else ''}")
    assert not problems, "\n".join(problems[:40])


def test_reader_lists_20000_entries(kernel_only: Pair) -> None:
    from scratchfs.squashfs import Image

    with Image.open(kernel_only.image) as img:
        big = img.lookup(img.root, b"big")
        assert big is not None and big.is_dir
        names = [n for n, _ in img.listdir(big)]
    assert sorted(names) == sorted(os.listdir(os.fsencode(kernel_only.kernel / "big")))


# ------------------------------------------------------------------------ the harness itself

def test_diff_reports_each_field() -> None:
    """The comparison can fail: every field, xattr and hard-link change is reported."""
    base = {b"": Entry("dir", 0o40755, 0, 0, 3, 2, 0, 0, xattrs={}, ino=1),
            b"a": Entry("file", 0o100644, 1, 2, 3, 2, 10, 0, xattrs={b"user.x": b"1"}, sha256="aa", ino=2),
            b"b": Entry("file", 0o100644, 1, 2, 3, 2, 10, 0, xattrs={}, sha256="aa", ino=2)}  # fmt: skip
    assert mounts.diff(base, base) == []
    for fld, value in (("mode", 0o104644), ("uid", 7), ("gid", 7), ("size", 4), ("nlink", 1), ("mtime_ns", 11),
                       ("rdev", 5), ("sha256", "bb"), ("type", "fifo"), ("target", b"x")):  # fmt: skip
        changed = {k: Entry(**{**v.__dict__}) for k, v in base.items()}
        setattr(changed[b"a"], fld, value)
        assert any(fld in line for line in mounts.diff(base, changed)), fld
    changed = {k: Entry(**{**v.__dict__}) for k, v in base.items()}
    changed[b"a"].xattrs = {b"user.x": b"2"}
    assert any("user.x" in line for line in mounts.diff(base, changed))
    changed[b"b"].ino = 3
    assert any("hard-link group" in line for line in mounts.diff(base, changed))
    del changed[b"b"]
    assert any("missing" in line for line in mounts.diff(base, changed))


@pytest.mark.parametrize("builder", ["mksquashfs", "gensquashfs"])
def test_image_without_xattr_table(builder: str, need_mounts: None, tmp_path: Path) -> None:
    """No xattr table at all (mksquashfs -no-xattrs; gensquashfs without --keep-xattr)."""
    src = tmp_path / "src"
    imagegen.build_fuzz_seed_tree(src)
    image = tmp_path / "img.sqfs"
    if builder == "mksquashfs":
        cmd = ["mksquashfs", str(src), str(image), "-quiet", "-no-progress", "-no-xattrs", "-comp", "zstd"]
    else:
        cmd = ["gensquashfs", "-q", "-D", str(src), "-c", "zstd", str(image)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert imagegen.read_superblock(image)["xattr_id_table_start"] == imagegen.NO_TABLE
    with mounts.kernel_mount(image, tmp_path / "k") as k, mounts.scratchfs_mount(image, tmp_path / "f") as f:
        problems = mounts.diff(mounts.snapshot(k), mounts.snapshot(f.path))
    assert not problems, "\n".join(problems)
