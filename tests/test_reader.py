"""Tier (a): the squashfs reader and its block cache, in-process, on real mksquashfs images."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scratchfs.squashfs import BlockCache, CorruptImageError, Image, Inode, NotSquashfsError, SquashfsError
from scratchfs.squashfs.context import load_block_native
from scratchfs.squashfs.inode import NO_FRAGMENT
from tests import fuzz_worker, imagegen, mounts


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    rnd = __import__("random").Random(7)
    (root / "d1" / "d2").mkdir(parents=True)
    for i in range(60):
        size = rnd.choice([0, 1, 4095, 4096, 4097, 10_000, 65_536, 131_071, 131_072, 131_073, 300_000])
        data = bytes(rnd.getrandbits(8) for _ in range(min(size, 2048))) * (size // 2048 + 1)
        (root / ("d1" if i % 3 else "d1/d2") / f"f{i:03d}").write_bytes(data[:size])
    (root / "big").write_bytes(os.urandom(3 << 20))
    (root / "text").write_bytes(b"".join(b"line %d of a compressible file\n" % i for i in range(120_000)))
    with open(root / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.seek(2 << 20)
        f.write(b"middle")
    os.symlink("d1/f001", root / "link")
    os.link(root / "big", root / "big.hard")
    return root


@pytest.fixture(scope="module", params=["gzip", "zstd", "lzo"])
def image(request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("img") / f"t-{request.param}.sqfs"
    subprocess.run(
        ["mksquashfs", str(tree), str(out), "-comp", request.param, "-b", "64K", "-noappend", "-quiet", "-no-progress"],
        check=True,
    )
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_walk_and_read_match_source(image: Path, tree: Path) -> None:
    with Image.open(image) as img:
        seen = set()
        for path, node in img.walk():
            src = tree / os.fsdecode(path)
            st = os.lstat(src)
            seen.add(path)
            assert node.mode == st.st_mode, path
            assert node.mtime == int(st.st_mtime), path
            if node.is_file:
                assert node.size == st.st_size
                assert sha(img.read(node, 0, node.size + 10)) == sha(src.read_bytes()), path
            elif node.is_symlink:
                assert img.readlink(node) == os.fsencode(os.readlink(src))
        assert len(seen) == sum(1 for _ in tree.rglob("*")) + 1
        assert img.resolve("big").ino == img.resolve("big.hard").ino
        assert img.resolve("big").nlink == 2


def test_reads_at_odd_offsets(image: Path, tree: Path) -> None:
    with Image.open(image) as img:
        for name in ("big", "text", "sparse", "d1/f001", "d1/d2/f000"):
            node = img.resolve(name)
            data = (tree / name).read_bytes()
            bs = img.info.block_size
            for off in (0, 1, bs - 1, bs, bs + 1, 2 * bs - 3, len(data) - 1, len(data), len(data) + 5):
                for size in (1, 7, bs - 1, bs + 2, 3 * bs + 5):
                    assert img.read(node, off, size) == data[off : off + size], (name, off, size)


def test_threads_share_cache_and_get_same_bytes(image: Path, tree: Path) -> None:
    expect = (tree / "text").read_bytes()
    with Image.open(image, cache_size=1 << 20) as img:
        node = img.resolve("text")
        bs = img.info.block_size

        def chunk(i: int) -> bool:
            off = (i * 7919 * 13) % len(expect)
            return img.read(node, off, bs + 17) == expect[off : off + bs + 17]

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(chunk, range(400)))
        assert img.cache.size <= 1 << 20
        assert len(img._contexts) >= 2  # one libsquashfs context per thread that read


def test_not_squashfs_and_truncated(tmp_path: Path, image: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image" * 100)
    with pytest.raises(NotSquashfsError):
        Image.open(junk)
    cut = tmp_path / "cut.sqfs"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(CorruptImageError, match="truncated"):
        Image.open(cut)
    with pytest.raises(SquashfsError):
        Image.open(tmp_path / "missing.sqfs")


def test_corrupt_data_block_fails_only_that_file(tmp_path: Path, image: Path, tree: Path) -> None:
    data = bytearray(image.read_bytes())
    with Image.open(image) as img:
        node = img.resolve("text")
        off = node.block_offsets[1]
        assert not node.block_words[1] & (1 << 24), "block must be compressed for this test"
    data[off : off + 64] = bytes(64)  # zero the start of the second compressed block of "text"
    bad = tmp_path / "bad.sqfs"
    bad.write_bytes(bytes(data))
    expect = (tree / "text").read_bytes()
    with Image.open(bad) as img:
        node = img.resolve("text")
        bs = img.info.block_size
        assert img.read(node, 0, 100) == expect[:100]
        with pytest.raises(CorruptImageError):
            img.read(node, bs, bs)
        assert img.read(node, 2 * bs, bs) == expect[2 * bs : 3 * bs]
        other = img.resolve("d1/f001")
        assert img.read(other, 0, 1 << 20) == (tree / "d1/f001").read_bytes()


def test_native_block_loader_agrees_with_pread_and_decompress(image: Path) -> None:
    """Compressed data blocks (fragment blocks included) load through _blockload.c in one call
    (not for lzo, whose decompressor is Python's); every one decodes to what the two-call path
    gives."""
    from scratchfs.squashfs import _lib as L

    assert load_block_native is not None, "scratchfs/squashfs/_blockload*.so is missing: the build compiles it"
    with Image.open(image) as fast, Image.open(image) as slow:
        assert (fast._ctx().native is None) == (fast.info.compression == "lzo")
        slow._ctx().native = None
        blocks: set[tuple[int, int]] = set()
        for _, node in fast.walk():
            if node.is_file:
                words = node.block_words or ()
                blocks.update(
                    (node.block_offsets[i], w) for i, w in enumerate(words) if w & L.SQFS_BLOCK_SIZE_MASK
                )
                if node.frag_index != NO_FRAGMENT:
                    blocks.add(fast._fragment(node))
        packed = [(off, w) for off, w in sorted(blocks) if not w & L.SQFS_BLOCK_UNCOMPRESSED]
        assert len(packed) > 10
        for off, word in packed:
            assert fast._load_block(off, word, -1) == slow._load_block(off, word, -1), f"block at {off}"


class TestBlockCache:
    def test_lru_bound(self) -> None:
        c = BlockCache(10)
        for i in range(5):
            c.put(i, b"abcd")
        assert c.size <= 10 and len(c) == 2
        assert c.get(4) == b"abcd" and c.get(0) is None

    def test_concurrent_loads_are_deduplicated(self) -> None:
        c = BlockCache(1 << 20)
        calls = []
        gate = threading.Event()

        def load() -> bytes:
            calls.append(1)
            gate.wait(5)
            return b"x" * 10

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(c.get_or_load, "k", load) for _ in range(4)]
            while not calls:
                gate.wait(0.01)
            gate.set()
            assert [f.result() for f in futs] == [b"x" * 10] * 4
        assert len(calls) == 1

    def test_failed_load_propagates_and_is_not_cached(self) -> None:
        c = BlockCache(100)

        def boom() -> bytes:
            raise CorruptImageError("bad block")

        with pytest.raises(CorruptImageError):
            c.get_or_load("k", boom)
        assert c.get("k") is None and c.loading("k") is None
        assert c.get_or_load("k", lambda: b"ok") == b"ok"


def test_raw_spans_cover_exactly_the_incompressible_whole_blocks(tmp_path: Path) -> None:
    bs = 64 << 10
    src = tmp_path / "src"
    src.mkdir()
    rnd = os.urandom(5 * bs + 1000)  # 5 raw blocks, then a 1000-byte tail
    (src / "rand").write_bytes(rnd)
    mixed = os.urandom(bs) + b"z" * bs + os.urandom(bs)  # raw, compressed, raw
    (src / "mixed").write_bytes(mixed)
    for frag in (True, False):
        out = tmp_path / f"raw-{frag}.sqfs"
        extra = ["-tailends"] if frag else ["-no-fragments"]  # tail in a fragment, or a short last block
        subprocess.run(["mksquashfs", str(src), str(out), "-b", "64K", "-noappend", "-quiet", "-no-progress", *extra],
                       check=True)  # fmt: skip
        with Image.open(out) as img:
            ino = img.resolve(b"rand")
            for off, size in [(0, bs), (1, 3 * bs), (bs - 7, 2 * bs + 14), (4 * bs, bs)]:
                span = img.raw_span(ino, off, size)
                assert span is not None, (frag, off, size)
                buf = memoryview(bytearray(span[1]))
                img.read_raw_into(buf, span[0])
                assert bytes(buf) == rnd[off : off + size]
            # the tail: in a fragment (not raw) or a short last block stored as is
            tail = img.raw_span(ino, 5 * bs, 1000)
            if frag:
                assert tail is None and img.raw_span(ino, 4 * bs, bs + 1) is None
            else:
                assert tail is not None
                buf = memoryview(bytearray(tail[1]))
                img.read_raw_into(buf, tail[0])
                assert bytes(buf) == rnd[5 * bs :]
            m = img.resolve(b"mixed")
            assert img.raw_span(m, 0, bs) is not None and img.raw_span(m, 2 * bs, bs) is not None
            assert img.raw_span(m, 0, bs + 1) is None and img.raw_span(m, bs, bs) is None  # the compressed block
            assert img.raw_span(m, 3 * bs, 10) is None  # past the end


def test_served_blocks_are_dropped_only_when_wholly_served(tmp_path: Path) -> None:
    bs = 64 << 10
    src = tmp_path / "src"
    src.mkdir()
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(20_000))[: 9 * bs + 1234]
    (src / "text").write_bytes(text)
    with open(src / "sparse", "wb") as f:  # 4 sparse blocks, then one with data
        f.truncate(5 * bs)
        f.seek(4 * bs)
        f.write(b"x" * bs)
    for frag in (True, False):
        out = tmp_path / f"drop-{frag}.sqfs"
        extra = ["-tailends"] if frag else ["-no-fragments"]  # the tail in a fragment, or a short last block
        subprocess.run(["mksquashfs", str(src), str(out), "-b", "64K", "-noappend", "-quiet", "-no-progress", *extra],
                       check=True)  # fmt: skip
        with Image.open(out) as img:
            n = img.resolve(b"text")
            assert img.read(n, 0, n.size) == text
            keys = [k for k, _ in img.loads(n, 0, n.size)]  # 9 full blocks, then the tail's block
            assert len(keys) == 10 and all(k in img.cache for k in keys)
            img.drop_served(n, 10, 3 * bs + 5)  # wholly within: blocks 1 and 2
            assert [k in img.cache for k in keys[:5]] == [True, False, False, True, True]
            img.drop_served(n, 3 * bs, 9 * bs - 1)  # block 8 is one byte short
            assert [k in img.cache for k in keys] == [True] + [False] * 7 + [True, True]
            img.drop_served(n, 0, n.size)
            # a fragment block is shared by many small files: kept; a short last block goes
            assert [k in img.cache for k in keys] == [False] * 9 + [frag]
            assert img.read(n, 5, 2 * bs) == text[5 : 5 + 2 * bs]  # dropped blocks decode again
            s = img.resolve(b"sparse")
            assert img.read(s, 4 * bs, bs) == b"x" * bs
            (key,) = [k for k, _ in img.loads(s, 0, s.size)]
            img.drop_served(s, 0, 4 * bs)  # sparse blocks only (stored at the same offset as the next)
            assert key in img.cache
            img.drop_served(s, 0, s.size)
            assert key not in img.cache


# ------------------------------------------------ metadata decoding (inodes and directory listings)

BIG_DIR = 20_000


def _odd_name(i: int) -> bytes:
    """A unique entry name of 5 to 255 bytes (every length), some not UTF-8, some with control bytes."""
    stem = b"%05d" % i
    if i % 97 == 0:
        stem += b"\xff\xfe\x80"  # not UTF-8
    if i % 89 == 0:
        stem += b" \t\x01"
    return (stem + b"x" * 255)[: max(5 + i % 251, len(stem))]


@pytest.fixture(scope="module")
def names_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names") / "src"
    big = root / "big"
    big.mkdir(parents=True)
    b = os.fsencode(big)
    for i in range(BIG_DIR):
        path = os.path.join(b, _odd_name(i))
        if i % 1000 == 1:
            os.mkdir(path)
        elif i % 1000 == 2:
            os.symlink(b"t" * (i % 300 + 1), path)
        elif i % 1000 == 3:
            os.mkfifo(path)
        else:
            with open(path, "wb") as f:
                f.write(b"d" * (i % 5000))
    for n in (b"q", b"a" * 255, b"\xff" * 255, b"\xc3\x28" + b"z" * 253, b"\x7f\x1b[0m"):
        (root / os.fsdecode(n)).write_bytes(n)
    (root / "small").mkdir()
    (root / "small" / "only").write_bytes(b"1")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module", params=["mksquashfs", "gensquashfs"])
def names_image(request: pytest.FixtureRequest, names_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("names-img") / f"names-{request.param}.sqfs"
    if request.param == "mksquashfs":
        cmd = ["mksquashfs", str(names_tree), str(out), "-noappend", "-quiet", "-no-progress", "-comp", "zstd"]
    else:
        cmd = ["gensquashfs", "-q", "-f", "-c", "gzip", "-D", str(names_tree), "--keep-time", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


DT_OF_TYPE = {1: stat.S_IFDIR, 2: stat.S_IFREG, 3: stat.S_IFLNK, 4: stat.S_IFBLK, 5: stat.S_IFCHR, 6: stat.S_IFIFO,
              7: stat.S_IFSOCK}  # fmt: skip


def _scandir_type(e: os.DirEntry[bytes]) -> int:
    for kind, test in ((stat.S_IFDIR, e.is_dir), (stat.S_IFREG, e.is_file), (stat.S_IFLNK, e.is_symlink)):
        if test(follow_symlinks=False):
            return kind
    return stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)


@pytest.mark.mount
def test_listings_and_inodes_match_the_kernel(names_image: Path, need_mounts: None, tmp_path: Path) -> None:
    """Every directory as the kernel's squashfs driver lists it (names of 1-255 bytes, non-UTF-8
    and control bytes, 20,000 entries in one directory): same names in the same order, same
    inode numbers and types from the entries; every inode as the kernel stats it."""
    with mounts.kernel_mount(names_image, tmp_path / "k") as k, Image.open(names_image) as img:
        kroot = os.fsencode(k)
        checked = 0
        stack: list[tuple[bytes, Inode]] = [(b"", img.root)]
        while stack:
            rel, d = stack.pop()
            lst = img.listing(d)
            assert lst.error is None
            with os.scandir(os.path.join(kroot, rel) if rel else kroot) as it:
                want = [(e.name, e.inode(), _scandir_type(e)) for e in it]
            got = [(n, i, DT_OF_TYPE[t]) for n, i, t in zip(lst.names, lst.inos, lst.types, strict=True)]
            assert got == want, rel
            for name, ref in zip(lst.names, lst.refs, strict=True):
                path = os.path.join(rel, name) if rel else name
                node = img.inode_by_ref(ref)
                st = os.lstat(os.path.join(kroot, path))
                assert (node.ino, node.mode, node.uid, node.gid, node.size, node.nlink, node.mtime) == (
                    st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, int(st.st_mtime)), path
                if node.is_symlink:
                    assert node.target == os.readlink(os.path.join(kroot, path))
                if node.is_dir:
                    stack.append((path, node))
                checked += 1
    assert checked > BIG_DIR
    assert len(img.listing(img.resolve(b"big"))) == BIG_DIR


def test_listing_matches_the_source_tree(names_image: Path, names_tree: Path) -> None:
    """The same names without a mount: the big directory holds exactly the source's names."""
    with Image.open(names_image) as img:
        big = img.listing(img.resolve(b"big"))
        assert big.error is None
        assert sorted(big.names) == sorted(os.listdir(os.fsencode(names_tree / "big")))
        assert max(map(len, big.names)) == 255 and any(b"\xff" in n for n in big.names)
        top = img.listing(img.root)
        assert sorted(top.names) == sorted(os.listdir(os.fsencode(names_tree)))
        assert len(img.listing(img.resolve(b"empty"))) == 0


def _same_listing(a: object, b: object) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in ("names", "refs", "inos", "types"))


def _inode_fields(n: Inode) -> tuple[object, ...]:
    return tuple(list(v) if k == "block_words" and v is not None else v
                 for k in Inode.__slots__ if k not in ("_block_offsets", "frag_loc") for v in [getattr(n, k)])  # fmt: skip


def test_python_decoder_agrees_with_libsquashfs_on_damaged_images(tmp_path: Path) -> None:
    """The Python decoder of inodes and directories either gives exactly what libsquashfs's
    readers give, or steps aside (None) so that libsquashfs decodes it: it never accepts what
    libsquashfs refuses. Checked on mutants of two seed images (damaged metadata, truncation,
    superblock edits) and on references that point at arbitrary places in the inode table."""
    src = tmp_path / "src"
    imagegen.build_fuzz_seed_tree(src)
    seeds = []
    for name, extra in (("gzip", ["-comp", "gzip"]), ("raw", ["-noI", "-noD", "-noF", "-noX"])):
        out = tmp_path / f"{name}.sqfs"
        subprocess.run(["mksquashfs", str(src), str(out), "-b", "4096", "-noappend", "-quiet", "-no-progress", *extra],
                       check=True)  # fmt: skip
        seeds.append(out.read_bytes())
    counts = {"dir_same": 0, "dir_aside": 0, "inode_same": 0, "inode_aside": 0}
    mutant = tmp_path / "mutant.sqfs"
    rng = __import__("random").Random(3)
    for seed in seeds:
        for index in range(-1, 300):
            mutant.write_bytes(seed if index < 0 else fuzz_worker.mutate(seed, index)[0])
            try:
                img = Image.open(mutant, cache_size=1 << 20)
            except SquashfsError:
                continue
            with img:
                dirs, refs, seen = [img.root], [], {img.root.ref}
                while dirs:
                    d = dirs.pop()
                    fast = img._parse_dir(d)
                    try:
                        slow = img._read_dir(d)
                    except SquashfsError:
                        slow = None
                    if fast is None:
                        counts["dir_aside"] += 1
                    else:
                        assert slow is not None and slow.error is None and _same_listing(fast, slow), (index, d)
                        counts["dir_same"] += 1
                    lst = slow if slow is not None else fast
                    for r in lst.refs if lst is not None else []:
                        refs += [r, (r & ~0xFFFF) | ((r + rng.randint(-40, 40)) & 0xFFFF)]
                        try:
                            node = img._decode_inode(r)
                        except SquashfsError:
                            continue
                        if node.is_dir and node.ref not in seen and len(seen) < 50:
                            seen.add(node.ref)
                            dirs.append(node)
                for r in refs:
                    got = img._parse_inode(r)
                    try:
                        want: Inode | None = img._decode_inode(r)
                    except SquashfsError:
                        want = None
                    if got is None:
                        counts["inode_aside"] += 1
                    else:
                        assert want is not None and _inode_fields(got) == _inode_fields(want), (index, hex(r))
                        counts["inode_same"] += 1
    # Both ways were taken many times: the comparison is not vacuous.
    assert counts["dir_same"] > 500 and counts["inode_same"] > 10_000, counts
    assert counts["dir_aside"] > 20 and counts["inode_aside"] > 1_000, counts
