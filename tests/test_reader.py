"""Tier (a): the squashfs reader and its block cache, in-process, on real mksquashfs images."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scratchfs.squashfs import BlockCache, CorruptImageError, Image, NotSquashfsError, SquashfsError


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
