"""Tier (b): FUSE handlers awaited in-process, no mount (readdir needs a kernel token and is
covered by the real-mount tests)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from scratchfs import reading
from scratchfs.fuse_ops import ERRNO_TABLE, Operations, errno_for
from scratchfs.squashfs import CorruptImageError, Image, ImageIOError, LibraryError, SquashfsError
from scratchfs.tiers import Dataset
from tests.mounts import wait_for


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    (src / "dir").mkdir()
    (src / "dir" / "a.txt").write_bytes(b"hello\n" * 50_000)
    (src / "small").write_bytes(b"tiny")
    os.symlink("dir/a.txt", src / "link")
    os.setxattr(src / "small", "user.color", b"blue")
    out = tmp_path_factory.mktemp("img") / "t.sqfs"
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True)
    return out


def run(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


@pytest.fixture
def ops(image: Path) -> Operations:
    o = Operations(Dataset("t", Image.open(image)))
    yield o
    o.close()
    o.dataset.image.close()


def fuse_errno(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        run(fn, *args)
    return ei.value.errno


def test_lookup_getattr_read(ops: Operations) -> None:
    d = run(ops.lookup, pyfuse3.ROOT_INODE, b"dir", None)
    assert d.st_mode & 0o170000 == 0o040000
    f = run(ops.lookup, d.st_ino, b"a.txt", None)
    assert f.st_size == 300_000 and f.entry_timeout > 3600 and f.attr_timeout > 3600
    assert run(ops.getattr, f.st_ino, None).st_size == 300_000
    fi = run(ops.open, f.st_ino, os.O_RDONLY, None)
    assert fi.keep_cache
    data = run(ops.read, fi.fh, 5, 100_000)
    assert bytes(data) == (b"hello\n" * 50_000)[5:100_005]
    assert bytes(run(ops.read, fi.fh, 299_990, 4096)) == (b"hello\n" * 50_000)[299_990:]
    run(ops.release, fi.fh)
    assert fuse_errno(ops.read, fi.fh, 0, 10) == errno.EBADF


def test_blocks_wholly_served_leave_the_block_cache(ops: Operations) -> None:
    """Drop-behind: the kernel keeps what a read returned in its page cache, so blocks the
    read covered whole are dropped; a block read in part is kept for the neighbouring read,
    until reads following on from one another have covered it all."""
    img = ops.dataset.image
    d = run(ops.lookup, pyfuse3.ROOT_INODE, b"dir", None)
    f = run(ops.lookup, d.st_ino, b"a.txt", None)
    n = img.resolve(b"dir/a.txt")
    bs = img.info.block_size
    keys = [k for k, _ in img.loads(n, 0, 2 * bs)]
    content = b"hello\n" * 50_000
    fi = run(ops.open, f.st_ino, os.O_RDONLY, None)
    assert bytes(run(ops.read, fi.fh, 0, bs + 10)) == content[: bs + 10]
    assert [k in img.cache for k in keys] == [False, True]
    assert bytes(run(ops.read, fi.fh, bs + 20, bs - 20)) == content[bs + 20 : 2 * bs]
    assert [k in img.cache for k in keys] == [False, True]  # bytes 10-19 of block 1 were never served
    assert bytes(run(ops.read, fi.fh, 0, 2 * bs)) == content[: 2 * bs]
    assert [k in img.cache for k in keys] == [False, False]
    run(ops.release, fi.fh)
    # Reads smaller than a block, one after another: a block goes once they served it all.
    img.cache.clear()
    fi = run(ops.open, f.st_ino, os.O_RDONLY, None)
    assert bytes(run(ops.read, fi.fh, bs + 100, 1000)) == content[bs + 100 : bs + 1100]  # not from the start
    assert bytes(run(ops.read, fi.fh, 0, bs // 2)) == content[: bs // 2]
    assert [k in img.cache for k in keys] == [True, True]
    assert bytes(run(ops.read, fi.fh, bs // 2, bs // 2 + 50)) == content[bs // 2 : bs + 50]
    assert [k in img.cache for k in keys] == [False, True]
    assert bytes(run(ops.read, fi.fh, bs + 50, bs - 50)) == content[bs + 50 : 2 * bs]
    assert [k in img.cache for k in keys] == [False, False]
    run(ops.release, fi.fh)


def test_served_ranges_merge_in_any_order_and_stay_few() -> None:
    spans: list[list[int]] = []
    assert reading._note_served(spans, 20, 30) == (20, 30)
    assert reading._note_served(spans, 0, 10) == (0, 10)
    assert reading._note_served(spans, 40, 50) == (40, 50)
    assert spans == [[0, 10], [20, 30], [40, 50]]
    assert reading._note_served(spans, 10, 20) == (0, 30)  # fills a gap: joins both sides
    assert reading._note_served(spans, 25, 45) == (0, 50)  # overlaps
    assert spans == [[0, 50]]
    assert reading._note_served(spans, 5, 8) == (0, 50) and spans == [[0, 50]]  # inside
    for k in range(1, reading.SERVED_SPANS + 3):
        reading._note_served(spans, 100 * k, 100 * k + 10)
    assert len(spans) == reading.SERVED_SPANS  # the lowest went first: reads move up
    assert spans[0][0] > 0 and spans[-1] == [100 * (reading.SERVED_SPANS + 2), 100 * (reading.SERVED_SPANS + 2) + 10]


def test_no_open_mode_reads_by_inode(ops: Operations) -> None:
    """In no-open mode the hook hands read() the inode instead of a handle (see fusehook)."""
    from scratchfs.fusehook import FH_INODE

    d = run(ops.lookup, pyfuse3.ROOT_INODE, b"dir", None)
    f = run(ops.lookup, d.st_ino, b"a.txt", None)
    content = b"hello\n" * 50_000
    assert bytes(run(ops.read, FH_INODE | f.st_ino, 7, 200_000)) == content[7:200_007]
    assert bytes(run(ops.read, FH_INODE | f.st_ino, 299_000, 4096)) == content[299_000:]
    assert fuse_errno(ops.read, FH_INODE | d.st_ino, 0, 10) == errno.EISDIR
    run(ops.forget, [(f.st_ino, 1)])  # the kernel forgot it: its read state goes too
    assert fuse_errno(ops.read, FH_INODE | f.st_ino, 0, 10) == errno.ESTALE


def test_negative_lookup_is_cacheable(ops: Operations) -> None:
    neg = run(ops.lookup, pyfuse3.ROOT_INODE, b"nope", None)
    assert neg.st_ino == 0 and neg.entry_timeout > 0


def test_readlink_xattrs_statfs(ops: Operations) -> None:
    ln = run(ops.lookup, pyfuse3.ROOT_INODE, b"link", None)
    assert run(ops.readlink, ln.st_ino, None) == b"dir/a.txt"
    sm = run(ops.lookup, pyfuse3.ROOT_INODE, b"small", None)
    assert run(ops.listxattr, sm.st_ino, None) == [b"user.color"]
    assert run(ops.getxattr, sm.st_ino, b"user.color", None) == b"blue"
    assert fuse_errno(ops.getxattr, sm.st_ino, b"user.nope", None) == errno.ENODATA
    st = run(ops.statfs, None)
    assert st.f_files > 0 and st.f_bfree == 0


def test_writes_are_refused(ops: Operations) -> None:
    sm = run(ops.lookup, pyfuse3.ROOT_INODE, b"small", None)
    assert fuse_errno(ops.open, sm.st_ino, os.O_WRONLY, None) == errno.EROFS
    assert fuse_errno(ops.mkdir, pyfuse3.ROOT_INODE, b"x", 0o755, None) == errno.EROFS
    assert fuse_errno(ops.unlink, pyfuse3.ROOT_INODE, b"small", None) == errno.EROFS
    assert fuse_errno(ops.access, sm.st_ino, os.W_OK, None) == errno.EROFS


def test_forget_drops_nodes_and_stale_inode_is_estale(ops: Operations) -> None:
    sm = run(ops.lookup, pyfuse3.ROOT_INODE, b"small", None)
    run(ops.forget, [(sm.st_ino, 1)])
    assert fuse_errno(ops.getattr, sm.st_ino, None) == errno.ESTALE
    assert run(ops.getattr, pyfuse3.ROOT_INODE, None).st_ino == pyfuse3.ROOT_INODE


def test_unexpected_exception_becomes_eio_logged_once(
    ops: Operations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_a: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(ops.dataset.image, "lookup", broken)
    with caplog.at_level(logging.DEBUG, logger="scratchfs.fuse_ops"):
        for _ in range(3):
            assert fuse_errno(ops.lookup, pyfuse3.ROOT_INODE, b"dir", None) == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_corrupt_block_is_eio_for_that_file_only(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    img = ops.dataset.image
    a = run(ops.lookup, run(ops.lookup, pyfuse3.ROOT_INODE, b"dir", None).st_ino, b"a.txt", None)
    sm = run(ops.lookup, pyfuse3.ROOT_INODE, b"small", None)
    real = img._load_block

    def load(off: int, word: int, expect: int) -> bytes:
        if expect > 4:  # only the big file's blocks
            raise CorruptImageError("damaged block")
        return real(off, word, expect)

    monkeypatch.setattr(img, "_load_block", load)
    img.cache.clear()
    fa = run(ops.open, a.st_ino, os.O_RDONLY, None)
    assert fuse_errno(ops.read, fa.fh, 0, 4096) == errno.EIO
    fs = run(ops.open, sm.st_ino, os.O_RDONLY, None)
    assert bytes(run(ops.read, fs.fh, 0, 4096)) == b"tiny"
    assert ops.bad_files == {("t", img.resolve("dir/a.txt").ino)}


def test_errno_table() -> None:
    assert errno_for(CorruptImageError("x")) == errno.EIO
    assert errno_for(ImageIOError("x")) == errno.EIO
    assert errno_for(LibraryError("x")) == errno.ENOMEM
    assert errno_for(SquashfsError("x")) == errno.EIO
    assert errno_for(PermissionError(errno.EACCES, "x")) == errno.EACCES
    assert errno_for(ValueError("x")) == errno.EIO
    assert all(isinstance(e, int) and e > 0 for _, e in ERRNO_TABLE)


def test_namespace_root_lists_datasets_and_follows_changes(image: Path) -> None:
    from scratchfs.namespace import Namespace

    ns = Namespace()
    a = ns.add("alpha.v1", Image.open(image))
    ns.add("beta", Image.open(image))
    o = Operations(ns)
    try:
        root = run(o.getattr, pyfuse3.ROOT_INODE, None)
        assert root.st_mode & 0o170000 == 0o040000 and root.attr_timeout <= 1.0
        ea = run(o.lookup, pyfuse3.ROOT_INODE, b"alpha.v1", None)
        eb = run(o.lookup, pyfuse3.ROOT_INODE, b"beta", None)
        assert ea.st_ino != eb.st_ino and ea.entry_timeout <= 1.0
        small_a = run(o.lookup, ea.st_ino, b"small", None)
        small_b = run(o.lookup, eb.st_ino, b"small", None)
        assert small_a.st_ino != small_b.st_ino  # same image, distinct datasets
        fi = run(o.open, small_a.st_ino, os.O_RDONLY, None)
        assert bytes(run(o.read, fi.fh, 0, 100)) == b"tiny"
        assert o.open_handles(a) == 1
        st = run(o.statfs, None)
        assert st.f_files == 2 * a.image.info.inode_count
        ns.remove("alpha.v1")
        assert run(o.lookup, pyfuse3.ROOT_INODE, b"alpha.v1", None).st_ino == 0
        # an open file of a removed dataset keeps reading
        assert bytes(run(o.read, fi.fh, 0, 100)) == b"tiny"
        assert run(o.lookup, pyfuse3.ROOT_INODE, b"nope", None).st_ino == 0
    finally:
        o.close()
        for ds in [a, *ns.datasets()]:
            ds.image.close()


def test_swap_moves_open_handles_and_counts_tiers(image: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ds = Dataset("t", Image.open(image))
    seen: list[tuple[str, int]] = []
    ds.on_read = lambda _d, tier, n: seen.append((tier, n))
    o = Operations(ds)
    try:
        e = run(o.lookup, pyfuse3.ROOT_INODE, b"small", None)
        fi = run(o.open, e.st_ino, os.O_RDONLY, None)
        assert bytes(run(o.read, fi.fh, 0, 10)) == b"tiny"
        old = ds.image
        ds.swap(Image.open(copy), "cache")
        assert old._closed  # idle: closed at once
        assert bytes(run(o.read, fi.fh, 0, 10)) == b"tiny"
        assert seen == [("scratch", 4), ("cache", 4)]
    finally:
        o.close()
        ds.image.close()


def _before_loads(img: Image, before: Callable[[], object]) -> None:
    """Make every block load of *img* call *before* first, in the thread that runs the load
    (to hold a load back, or see where it runs)."""
    real = img.loads

    def loads(*args: Any, **kw: Any) -> Any:
        def wrap(load: Callable[[], bytes]) -> Callable[[], bytes]:
            def run_load() -> bytes:
                before()
                return load()

            return run_load

        return [(key, wrap(load)) for key, load in real(*args, **kw)]

    img.loads = loads  # type: ignore[method-assign]


def _gate_loads(img: Image) -> tuple[threading.Event, list[bool]]:
    """Hold every block load of *img* until the returned event is set (5 s at most); the list
    gets an entry per load that ran (standing in for slow scratch)."""
    gate = threading.Event()
    done: list[bool] = []

    def held() -> None:
        gate.wait(5)
        done.append(True)

    _before_loads(img, held)
    return gate, done


async def _open_a_txt(o: Operations, dataset: bytes) -> int:
    """Look up and open dir/a.txt of *dataset* in a namespace mount; its file handle."""
    top = await o.lookup(pyfuse3.ROOT_INODE, dataset, None)
    d = await o.lookup(top.st_ino, b"dir", None)
    f = await o.lookup(d.st_ino, b"a.txt", None)
    return int((await o.open(f.st_ino, os.O_RDONLY, None)).fh)


def test_read_waiting_on_scratch_starts_over_on_the_switched_copy(image: Path, tmp_path: Path) -> None:
    """A read of a scratch-tier dataset (mountd) waits for its block in the decode pool, not
    on the FUSE thread; when the dataset is switched meanwhile, the read is served from the new
    copy at once instead of waiting for the slow one. The slow read is a real decode held back
    by a gate (standing in for throttled scratch)."""
    import shutil

    from scratchfs.namespace import Namespace

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ns = Namespace()
    ds = ns.add("t", Image.open(image))
    slow = ds.image
    gate, slow_done = _gate_loads(slow)
    o = Operations(ns)
    expect = b"hello\n" * 50_000
    try:

        async def scenario() -> bytes:
            fh = await _open_a_txt(o, b"t")
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    got.append(bytes(await o.read(fh, 1000, 70_000)))

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert ds.waiters  # the read is parked on the gated decode
                assert not got and not gate.is_set()
                ds.swap(Image.open(copy), "cache")
            assert not slow_done  # served without waiting for the slow decode
            return got[0]

        assert run(scenario) == expect[1000:71_000]
    finally:
        gate.set()
        o.close()
        ds.image.close()
        slow.close()



def test_read_waiting_on_the_cached_copy_finishes_there_on_demotion(image: Path, tmp_path: Path) -> None:
    """The mirror case: a read of a cache-tier dataset waiting for its blocks in the decode pool
    is not started over on scratch when the dataset is demoted meanwhile (scratch is the slow
    copy); it finishes on the cached copy, which stays open until then, and scratch is not read."""
    import shutil

    from scratchfs.namespace import Namespace

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ns = Namespace()
    ds = ns.add("t", Image.open(copy), tier="cache")
    cached = ds.image
    gate, cached_done = _gate_loads(cached)
    scratch = Image.open(image)
    scratch_loads: list[bool] = []
    _before_loads(scratch, lambda: scratch_loads.append(True))
    o = Operations(ns)
    expect = b"hello\n" * 50_000
    block = cached.info.block_size
    try:

        async def scenario() -> bytes:
            fh = await _open_a_txt(o, b"t")
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def reader() -> None:  # across a block boundary: two blocks, decoded in the pool
                    got.append(bytes(await o.read(fh, block - 500, 1000)))

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert ds.waiters  # the read is parked on the gated decode
                ds.swap(scratch, "scratch")
                await trio.testing.wait_all_tasks_blocked()
                assert not got  # still waiting for the cached copy's blocks
                assert not cached._closed  # held open by the read in flight
                gate.set()
            assert cached_done  # it was served by the cached copy's decode
            return got[0]

        assert run(scenario) == expect[block - 500 : block + 500]
        assert not scratch_loads  # scratch was not read
        # closed once its last user let go: the decode pool's worker thread may release its hold
        # just after the read it served has returned
        wait_for(lambda: cached._closed, "the demoted cached image closed", timeout=10, interval=0.01)
    finally:
        gate.set()
        o.close()
        ds.image.close()
        cached.close()



def test_scratch_tier_loads_run_in_their_own_larger_pool(image: Path, tmp_path: Path) -> None:
    """Under mountd (a namespace), blocks of a dataset on scratch load in the scratch pool
    (SCRATCH_IO_THREADS threads: loads there wait for the network filesystem), blocks of a
    cached dataset in the decode pool (one thread per core); a single-image mount has one pool."""
    import shutil

    from scratchfs.namespace import Namespace

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ns = Namespace()
    on_scratch = ns.add("s", Image.open(image), tier="scratch")
    on_cache = ns.add("c", Image.open(copy), tier="cache")
    threads: dict[str, set[str]] = {"s": set(), "c": set()}
    for name, ds in (("s", on_scratch), ("c", on_cache)):
        _before_loads(ds.image, lambda seen=threads[name]: seen.add(threading.current_thread().name))
    o = Operations(ns, workers=2)
    expect = b"hello\n" * 50_000
    block = on_scratch.image.info.block_size
    try:

        async def read_both() -> list[bytes]:
            out = []
            for name in (b"s", b"c"):
                fh = await _open_a_txt(o, name)
                out.append(bytes(await o.read(fh, block - 500, 1000)))  # two blocks: pool loads
            return out

        assert run(read_both) == [expect[block - 500 : block + 500]] * 2
        assert threads["s"] and all(t.startswith("scratch-") for t in threads["s"]), threads
        assert threads["c"] and all(t.startswith("sqfs-") for t in threads["c"]), threads
        assert o.reader._io_pool.workers == reading.SCRATCH_IO_THREADS and o.reader._pool.workers == 2
    finally:
        o.close()
        on_scratch.image.close()
        on_cache.image.close()
    single = Operations(Dataset("t", Image.open(image)), workers=2)
    try:
        assert single.reader._io_pool is single.reader._pool
    finally:
        single.close()
        assert single.dataset is not None
        single.dataset.image.close()



def test_readahead_starts_again_on_the_copy_a_file_switched_to(image: Path, tmp_path: Path) -> None:
    """Readahead queued on one copy of an image does not count on another: after a switch the
    blocks ahead of a sequential reader are queued again on the new copy (not only those
    beyond where the old copy's readahead had got to, which the reader would meet cold)."""
    import shutil

    from scratchfs.namespace import Namespace

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ns = Namespace()
    ds = ns.add("t", Image.open(image), tier="scratch")
    first = ds.image
    o = Operations(ns, readahead_bytes=200_000)
    started: list[tuple[Image, int]] = []
    o.reader._start = lambda _ds, img, loads, _prio: started.extend((img, key[1]) for key, _ in loads) or []  # type: ignore[method-assign,func-returns-value]
    try:
        n = first.lookup(first.lookup(first.root, b"dir"), b"a.txt")
        h = reading.ReadState(ds, n)
        block = first.info.block_size
        o.reader._ahead(h, ds, first, n, 0, 1000)
        h.next_off = 1000
        assert started and {img for img, _ in started} == {first}
        ahead_first = h.ahead_until
        assert ahead_first > block
        started.clear()
        o.reader._ahead(h, ds, first, n, 1000, 1000)  # the same copy: nothing new to queue
        assert not started
        second = Image.open(copy)
        ds.swap(second, "cache")
        o.reader._ahead(h, ds, second, n, 2000, 1000)
        assert started and {img for img, _ in started} == {second}
        assert min(pos for _, pos in started) < ahead_first  # from the reader, not from the old mark
    finally:
        o.close()
        ds.image.close()


def test_warm_copy_decodes_what_open_files_read_next(image: Path, tmp_path: Path) -> None:
    """read_positions lists the open files of a dataset at the end of their furthest read;
    warm_copy decodes the bytes after each into another copy's block cache, with inodes of
    the first copy (copies are byte-identical), so reads after a switch find them ready."""
    import shutil

    from scratchfs.namespace import Namespace
    from scratchfs.tiers import warm_copy

    copy = tmp_path / "copy.sqfs"
    shutil.copyfile(image, copy)
    ns = Namespace()
    ds = ns.add("t", Image.open(copy), tier="cache")
    other = ns.add("u", Image.open(image), tier="scratch")
    o = Operations(ns)
    scratch = Image.open(image)
    try:

        async def open_and_read() -> None:
            for name in (b"t", b"u"):
                fh = await _open_a_txt(o, name)
                await o.read(fh, 0, 100_000)

        run(open_and_read)
        positions = o.read_positions(ds)
        assert [(n.ino, off) for n, off in positions] == [(ds.image.lookup(ds.image.lookup(ds.image.root, b"dir"), b"a.txt").ino, 100_000)]
        n, off = positions[0]
        assert scratch.read_view(n, off, 150_000, load=False) is None  # cold before
        assert warm_copy(scratch, positions, 150_000) == 150_000
        assert bytes(scratch.read_view(n, off, 150_000, load=False) or b"") == (b"hello\n" * 50_000)[off : off + 150_000]
        assert o.read_positions(other) != [] and o.read_positions(ds, limit=0) == []
    finally:
        o.close()
        scratch.close()
        ds.image.close()
        other.image.close()


def _evict(path: Path) -> None:
    """Drop *path* from the page cache, checked with util-linux's fincore (mincore(2), which,
    unlike a read, starts no readahead that would bring the pages back).

    POSIX_FADV_DONTNEED skips pages it cannot drop at that moment (seen once in CI), so it
    is tried a few times, then (as root) the kernel's drop_caches for clean pages.
    """
    for attempt in range(4):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if attempt == 3 and os.geteuid() == 0:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        if int(res.stdout.strip()) == 0:
            return
    pytest.fail(f"{path} stays in the page cache: the test's premise does not hold")


def _raw_image(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    content = os.urandom(3 << 20)  # incompressible: stored as is, in 128 KiB blocks
    (src / "noise").write_bytes(content)
    out = tmp_path / "raw.sqfs"
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True)
    return out, content


async def _read_at_once(o: Operations, ino: int, offsets: Sequence[int], size: int) -> dict[int, bytes]:
    """Reads of *size* bytes at each of *offsets* of file *ino* (no-open mode), all at once."""
    from scratchfs.fusehook import FH_INODE

    got: dict[int, bytes] = {}

    async def one(off: int) -> None:
        got[off] = bytes(await o.read(FH_INODE | ino, off, size))

    async with trio.open_nursery() as n:
        for off in offsets:
            n.start_soon(one, off)
    return got


def test_large_reads_of_raw_data_are_copied_by_decode_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of at least RAW_POOL_MIN bytes stored as is is copied out of the image by a
    decode worker, cached in the page cache or not: the trio thread serves other requests."""
    from scratchfs.reading import RAW_POOL_MIN

    out, content = _raw_image(tmp_path)
    img = Image.open(out)
    o = Operations(Dataset("raw", img))
    threads: list[str] = []
    real_read_raw = img.read_raw

    def read_raw(pos: int, length: int) -> bytes:
        threads.append(threading.current_thread().name)
        return real_read_raw(pos, length)

    monkeypatch.setattr(img, "read_raw", read_raw)
    monkeypatch.setattr(img, "read_raw_into", None)  # not used for these reads
    offsets = (0, 1 << 20, 2 << 20 | 4096)
    try:
        ino = run(o.lookup, pyfuse3.ROOT_INODE, b"noise", None).st_ino
        for evict in (True, False):
            if evict:
                _evict(out)
            threads.clear()
            got = run(_read_at_once, o, ino, offsets, RAW_POOL_MIN)
            assert got == {off: content[off : off + RAW_POOL_MIN] for off in offsets}
            assert len(threads) == 3 and all(t.startswith("sqfs-") for t in threads), threads
    finally:
        o.close()
        img.close()


def test_uncached_raw_data_is_read_off_the_trio_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data stored as is and not in the page cache is read in a worker thread (so that other
    requests go on meanwhile), each read into its own buffer; cached data is read inline.
    (Reads below RAW_POOL_MIN: larger ones always go to a decode worker, see above.)"""
    out, content = _raw_image(tmp_path)
    size = 128 << 10
    img = Image.open(out)
    o = Operations(Dataset("raw", img))
    threads: list[str] = []
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        threads.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    misses: list[int] = []
    real_read_raw = img.read_raw_into

    def read_raw_into(buf: Any, pos: int, cached_only: bool = False) -> bool:
        ok = real_read_raw(buf, pos, cached_only)
        if cached_only and not ok:
            misses.append(pos)
        return ok

    monkeypatch.setattr(img, "read_raw_into", read_raw_into)
    offsets = (0, 1 << 20, 2 << 20)
    try:
        ino = run(o.lookup, pyfuse3.ROOT_INODE, b"noise", None).st_ino
        span = img.raw_span(o._inode(ino)[1], 0, size)
        assert span is not None
        # The page-cache-only attempt (RWF_NOWAIT) starts the kernel's readahead when it
        # misses, and on a fast disk that I/O can finish before the check: a read of evicted
        # bytes may then be served without a thread, legitimately. So: every miss must go to
        # exactly one thread read and nothing else may, and a miss must happen in some try.
        for _ in range(5):
            _evict(out)
            threads.clear()
            misses.clear()
            got = run(_read_at_once, o, ino, offsets, size)
            assert got == {off: content[off : off + size] for off in got} and len(got) == 3
            assert set(threads) <= {"read_raw_into"} and len(threads) == len(misses), (threads, misses)
            if misses:
                break
        else:
            pytest.fail("in 5 tries no read of evicted bytes tried the page cache and missed it")
        threads.clear()
        got = run(_read_at_once, o, ino, offsets, size)  # cached now: read inline, no thread
        assert threads == []
        assert got == {off: content[off : off + size] for off in got} and len(got) == 3
    finally:
        o.close()
        img.close()
