"""Serving read requests from squashfs images: the read path below the FUSE adapter.

Knows nothing of FUSE: :mod:`scratchfs.fuse_ops` hands it each read request with the file's
:class:`ReadState` and turns its errors into errnos.

Requests stay on the trio thread while they are cheap (cached blocks). Decoding a block that
is not cached runs in a worker thread of a :class:`~scratchfs.decodepool.DecodePool` (each
with its own libsquashfs context); sequential readers get readahead into the shared block
cache, and blocks every byte of which has been served are dropped from it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

import trio

from .decodepool import AHEAD, DEMAND, DecodePool
from .squashfs import Image, ImageIOError, Inode
from .squashfs.inode import NO_FRAGMENT
from .stats import CACHE
from .tiers import Dataset

log = logging.getLogger(__name__)

# Fragment blocks decoded ahead of a small-file reader, in the decode pool. On 2 cores it costs
# more than it saves (the reader, the kernel and this thread fill both; the pool's Python work
# contends for the GIL): cold small files were 13-18 % faster without it (gzip and zstd
# images, medians of 4 interleaved runs). With more cores the pool decodes beside this thread.
FRAGMENT_READAHEAD = 2 if (os.cpu_count() or 1) > 2 else 0
# A read within this distance of where the handle's reads have got to continues a sequential
# stream: the kernel sends a stream's requests several at a time, not always in order.
SEQ_SLACK = 8 << 20
# Readahead blocks decoded per pool job: fewer queue hand-offs and wake-ups per block. Cold
# zstd reads, 6 interleaved runs each: one 256 MiB text file after another +7 %, two readers
# at once +12 % (medians) with 4 against 1; gzip unchanged.
AHEAD_BATCH = 4
# Under mountd, loads of datasets on scratch go to a pool of their own with this many threads:
# each load waits for scratch (a network filesystem: latency per request) before it decodes, and
# the number of loads in flight is what hides that latency. The decode pool (one thread per core)
# stays for the cache tier, where more threads than cores only contend. Through a 100 MiB/s
# link with 0.5 ms latency (bench_mountd --emulator link), cold sequential reads on scratch
# (2 cores): 79-93 MB/s in the decode pool's 2 threads, 114 MB/s in a scratch pool of 8, against
# 124 MB/s for `scratchfs mount` of the image through the same link (its limit: ~131 MB/s).
# One pool of 8 for both tiers did as well on scratch but cut reads of the cached copy to 0.72x.
SCRATCH_IO_THREADS = 8
# Reads of data stored as is at least this large are copied out of the image by a decode
# worker, not on the FUSE thread: a 1 MiB pread there (page-cache copy, readahead of the image
# file) took 1-2 ms during which no other request was served. Cold sequential reads of the
# benchmark's files (half stored as is), 5 interleaved runs, two tries: zstd 457 -> 517 and
# 450 -> 568 MB/s, gzip 354 -> 378 MB/s; two readers unchanged.
RAW_POOL_MIN = 256 << 10
# Ranges of a file each handle remembers as served, to find blocks that several reads served
# together (see _note_served): enough for the kernel's requests answered out of order.
SERVED_SPANS = 8


class ReadState:
    """What the reads of one open file (or, in no-open mode, of one file) have done so far."""

    __slots__ = ("dataset", "inode", "next_off", "ahead_until", "ahead_on", "served")

    def __init__(self, dataset: Dataset, inode: Inode) -> None:
        self.dataset = dataset
        self.inode = inode
        self.next_off = 0  # the end of the furthest read so far
        self.served: list[list[int]] = []  # [start, end) ranges served in full, in order (see _note_served)
        self.ahead_until = 0  # readahead was queued up to here ...
        self.ahead_on: weakref.ref[Image] | None = None  # ... on this copy (not kept alive by it)


class Reader:
    """Reads of files of datasets' images, with worker pools for decoding (see the module
    docstring).  *scratch*: datasets may be served from slow scratch (mountd): loads of them
    go to a pool of their own (SCRATCH_IO_THREADS) and are never done on the trio thread."""

    def __init__(self, *, workers: int | None = None, scratch: bool = False, readahead_bytes: int = 4 << 20) -> None:
        self._scratch = scratch
        self._pool = DecodePool(workers or max(2, os.cpu_count() or 2))
        self._io_pool = DecodePool(SCRATCH_IO_THREADS, name="scratch") if scratch else self._pool
        self._raw_buf = bytearray(1 << 20)
        self._readahead_bytes = readahead_bytes
        self._reads_waiting = 0  # read requests being served right now (this one included)

    def close(self) -> None:
        self._pool.close(wait=True)
        if self._io_pool is not self._pool:
            self._io_pool.close(wait=True)

    async def read(self, h: ReadState, off: int, size: int) -> memoryview | bytes:
        """The bytes of one read request of the file of *h*; readahead queued, blocks served
        in full dropped.  SquashfsError (and ImageIOError) when its data cannot be read."""
        ds = h.dataset
        n = h.inode
        while True:
            img = ds.begin()
            nbytes = 0
            self._reads_waiting += 1
            try:
                data = await self._read_from(h, ds, img, off, size)
                if data is None:
                    continue  # the dataset switched tiers while this read waited: start over
                nbytes = len(data)
            finally:
                self._reads_waiting -= 1
                ds.end(img, nbytes)
            break
        if nbytes and n.block_words:  # (a small file's data is all in a fragment block)
            self._drop_behind(h, img, n, off, off + nbytes)
        self._ahead(h, ds, img, n, off, nbytes)
        if n.frag_index != NO_FRAGMENT and off + size >= n.size:
            # Small files are read in directory order, and mksquashfs packs their tails in
            # that order: keep the next fragment blocks decoding ahead.
            for idx in range(n.frag_index + 1, n.frag_index + 1 + FRAGMENT_READAHEAD):
                load = img.fragment_load(idx)
                if load is not None:
                    self._start(ds, img, [load], AHEAD)
        if off + nbytes > h.next_off:
            h.next_off = off + nbytes
        return data

    @staticmethod
    def _drop_behind(h: ReadState, img: Image, n: Inode, off: int, end: int) -> None:
        """After a read of [*off*, *end*) was served: drop the blocks it completed.

        A block is complete once reads have served every byte of it: the read alone, or with
        the reads next to it (blocks larger than the kernel's requests, requests that do not
        line up with blocks, requests answered out of order). See Image.drop_served.
        """
        lo, hi = _note_served(h.served, off, end)
        bs = img.info.block_size
        img.drop_served(n, max(lo, off - off % bs), min(hi, end + (-end) % bs))

    async def _read_from(self, h: ReadState, ds: Dataset, img: Image, off: int, size: int) -> memoryview | bytes | None:
        """The bytes of one read request from *img*; None if *ds* switched to another image
        while the read waited for blocks (the caller starts over on the new one).

        Cached blocks are served at once. Otherwise each block nobody is decoding yet is
        handed to the decode pool as its own job (the blocks of one request decode on every
        core), and blocks being decoded are awaited. On fast storage a lone one-block read is
        decoded right here, and a small read of data stored as is is one pread: a thread hop
        costs more (a pread that would wait for the disk does go to a thread; a large one goes
        to a decode worker, see RAW_POOL_MIN). Not on scratch (*scratch*, under
        mountd): I/O that may take long must not stall every other request, and a read
        waiting on scratch moves to the SSD copy the moment it is switched.
        """
        n = h.inode
        inline = not self._scratch or ds.tier == CACHE
        data: memoryview | bytes | None
        span = img.raw_span(n, off, size) if inline else None
        if span is not None:
            # Incompressible data is stored as is: one pread into a buffer reused by every
            # request (pyfuse3 copies the reply out before this thread runs another task).
            pos, length = span
            if length >= RAW_POOL_MIN:
                return await self._read_raw_in_pool(img, pos, length)
            if len(self._raw_buf) < length:
                self._raw_buf = bytearray(length)
            data = memoryview(self._raw_buf)[:length]
            if img.read_raw_into(data, pos, cached_only=True):
                return data
            # Not in the page cache: the disk read waits in a worker thread, so that other
            # requests (another reader, the kernel's readahead of this one) go on meanwhile.
            data = memoryview(bytearray(length))
            await trio.to_thread.run_sync(img.read_raw_into, data, pos)
            return data
        if (data := img.read_view(n, off, size, load=False)) is not None:
            return data
        loads = img.loads(n, off, size)
        if inline and len(loads) == 1 and self._reads_waiting == 1 and img.cache.loading(loads[0][0]) is None:
            return img.read_view(n, off, size, load=True)
        futs = self._start(ds, img, loads, DEMAND)
        self._ahead(h, ds, img, n, off, size)
        if futs and not await self._wait(ds, img, futs):
            return None
        # Blocks whose load failed are loaded once more here, raising the error.
        return img.read_view(n, off, size, load=True)

    async def _read_raw_in_pool(self, img: Image, pos: int, length: int) -> bytes:
        """*length* bytes stored as is at image offset *pos*, read by a decode worker (which
        also allocates them: zeroing a 1 MiB bytearray here cost the FUSE thread ~9 % of its
        time in a cold sequential read)."""
        fut: Future[bytes] = Future()

        def job() -> None:
            try:
                fut.set_result(img.read_raw(pos, length))
            except BaseException as e:
                fut.set_exception(e)

        self._pool.submit(DEMAND, job, lambda: fut.set_exception(ImageIOError(f"{img.path}: unmounting")))
        await _wait_futures([fut], trio.Event())
        return fut.result()

    async def _wait(self, ds: Dataset, img: Image, futs: list[Future[bytes]]) -> bool:
        """Wait for *futs*; False if *ds* switched away from *img* before they were all done."""
        ev = trio.Event()
        ds.waiters.add(ev.set)
        try:
            await _wait_futures(futs, ev)
        finally:
            ds.waiters.discard(ev.set)
        return ds.image is img or all(f.done() for f in futs)

    def _start(
        self, ds: Dataset, img: Image, loads: Sequence[tuple[Hashable, Callable[[], bytes]]], priority: int
    ) -> list[Future[bytes]]:
        """Claim and queue the loads nobody has started; futures of all that are not cached."""
        futs: list[Future[bytes]] = []
        cache = img.cache
        if not ds.acquire(img):  # closed by a tier switch meanwhile (readahead after the read)
            return futs
        batch = AHEAD_BATCH if priority == AHEAD else 1
        jobs: list[tuple[Hashable, Future[bytes], Callable[[], bytes]]] = []
        try:
            for key, load in loads:
                claim = cache.begin_load(key)
                if claim is None:
                    continue
                fut, mine = claim
                futs.append(fut)
                if mine:
                    ds.acquire(img)  # held until the job ran (or was cancelled)
                    jobs.append((key, fut, load))
                    if len(jobs) >= batch:
                        self._submit(priority, ds, img, jobs)
                        jobs = []
            if jobs:
                self._submit(priority, ds, img, jobs)
        finally:
            ds.release(img)
        return futs

    def decoding(self) -> bool:
        """Worker threads have decode or load jobs queued or running."""
        return self._pool.busy() or self._io_pool.busy()

    def _submit(
        self, priority: int, ds: Dataset, img: Image, jobs: list[tuple[Hashable, Future[bytes], Callable[[], bytes]]]
    ) -> None:
        pool = self._pool if ds.tier_of(img) == CACHE else self._io_pool
        pool.submit(
            priority, functools.partial(_run_loads, ds, img, jobs), functools.partial(_cancel_loads, ds, img, jobs)
        )

    def _ahead(self, h: ReadState, ds: Dataset, img: Image, n: Inode, off: int, size: int) -> None:
        """Readahead for a handle whose reads move forward through the file."""
        if not h.next_off - SEQ_SLACK <= off <= h.next_off + SEQ_SLACK:
            return
        if h.ahead_on is None or h.ahead_on() is not img:  # queued on another copy (a switch): not here
            h.ahead_on, h.ahead_until = weakref.ref(img), 0
        start = max(off + size, h.ahead_until)
        stop = min(off + size + self._readahead_bytes, n.size)
        if stop - start < img.info.block_size and start < n.size and stop < n.size:
            return  # less than a block more to queue: wait for the reader to move on
        if stop > start:
            h.ahead_until = stop
            # Blocks stored as is are left to the kernel's readahead of the image file.
            self._start(ds, img, img.loads(n, start, stop - start, skip_raw=True), AHEAD)


def _note_served(spans: list[list[int]], off: int, end: int) -> tuple[int, int]:
    """Add [*off*, *end*) to *spans* (disjoint ``[start, end)`` ranges in order, merged when
    they touch); return the range it is now part of. At most SERVED_SPANS are kept: the one
    farthest from this read goes first."""
    i = 0
    while i < len(spans) and spans[i][1] < off:
        i += 1
    j = i
    while j < len(spans) and spans[j][0] <= end:
        j += 1
    if i < j:
        lo, hi = min(off, spans[i][0]), max(end, spans[j - 1][1])
    else:
        lo, hi = off, end
    spans[i:j] = [[lo, hi]]
    if len(spans) > SERVED_SPANS:
        del spans[0 if i >= len(spans) // 2 else -1]
    return lo, hi


async def _wait_futures(futs: list[Any], ev: trio.Event) -> None:
    """Wait, without blocking the trio thread, until worker threads completed all *futs*
    (or until someone else sets *ev*; it is set when they are all done).

    Only the last completion wakes the trio thread (each wake-up costs a socket write and a
    scheduling round).
    """
    pending = [f for f in futs if not f.done()]
    if not pending:
        return
    token = trio.lowlevel.current_trio_token()
    left = [len(pending)]
    lock = threading.Lock()

    def done(_f: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            try:
                token.run_sync_soon(ev.set)
            except trio.RunFinishedError:
                pass

    for f in pending:
        f.add_done_callback(done)
    await ev.wait()


def _run_loads(ds: Dataset, img: Image, jobs: list[tuple[Hashable, Future[bytes], Callable[[], bytes]]]) -> None:
    """A pool job: run the claimed *jobs* in order, each releasing the image hold it took."""
    for key, fut, load in jobs:
        try:
            img.cache.run_load(key, fut, load)
        except Exception:  # the reader waiting for this block loads it again and reports the error
            log.debug("decoding block %r of %s failed", key, img.path, exc_info=True)
        finally:
            ds.release(img)


def _cancel_loads(ds: Dataset, img: Image, jobs: list[tuple[Hashable, Future[bytes], Callable[[], bytes]]]) -> None:
    """A pool job that never ran: end its claims with an error and release the holds."""
    for key, fut, _ in jobs:
        try:
            img.cache.end_load(key, fut, None, ImageIOError(f"{img.path}: unmounting"))
        finally:
            ds.release(img)
