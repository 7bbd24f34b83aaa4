"""Take FUSE requests without a trip through trio's scheduler when the next one is (nearly) there.

pyfuse3 waits for every request through a trio lock and ``trio.lowlevel.wait_readable``: two
passes through trio's scheduler, an epoll registration, and the thread going to sleep and being
woken. A serial reader (``cat`` over thousands of small files, ``find -exec stat``) sends its
next request tens of microseconds after getting the last reply, and pays that sleep and wake-up
on each of its requests, twice per file (LOOKUP, READ).

:class:`EagerWait` replaces pyfuse3's wait function (``_wait_fuse_readable``, looked up by name
on each call, so the module attribute can be swapped). Unless a thread result is queued or
worker threads are decoding (``busy``), it polls /dev/fuse for up to ``spin_us`` microseconds
and lets the loop read the request as soon as there is one. Not while workers decode: every
poll and yield hands them the GIL and takes it back (with fuse_ops' 100 us switch interval,
futex traffic on every block), and a reader fed by readahead is not waiting on this thread.
Two cold readers of 256 MiB zstd files, 5 interleaved runs: 524 -> 604 MB/s, CPU of the
server 2.41 -> 2.19 s; one reader: 457 -> 553 MB/s, 2.88 -> 2.48 s; cold small files
(no worker busy) unchanged. Otherwise (thread results queued, nothing came in time, or ``EAGER_RUN``
requests in a row were taken this way) the original wait runs, so thread results, signals and
mountd's own tasks get their turn; other runnable tasks wait at most the polling budget. While
polling it yields the CPU to any other runnable thread (sched_yield: on a busy node the compute
threads, or the reader itself woken on this CPU, run first), and polling stops while it mostly
finds nothing (``MIN_HIT_RATE``), so a slow trickle of requests costs next to no CPU.

The replacement only goes in when the request hook (``_fusehook.c``) wraps
``fuse_session_receive_buf``: it supplies the descriptor to poll, made non-blocking, and it
turns EAGAIN into EINTR, which pyfuse3's loop retries. Both matter: a task that trio woke for a
request which another task took at once finds nothing to read (it must not sleep in read()
with the whole event loop), and a request can vanish between the poll and the read (its caller
was interrupted); pyfuse3 would end the session on EAGAIN.

This module does not import pyfuse3 (fuse_ops is the only one that does): it is handed the
module to patch.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import trio

from . import fusehook

log = logging.getLogger(__name__)

EAGER_RUN = 16  # requests taken in a row before the original wait runs once
SPIN_US = 200  # polling budget per request: a serial reader here answers within it 9 times in 10
# Polling is worth it while it mostly finds the next request: the share of recent polls that
# did (weight 1/8 per poll) must stay at least MIN_HIT_RATE, else only every PROBE_EVERY-th
# wait polls, to notice when a serial reader starts again.
MIN_HIT_RATE = 0.25
PROBE_EVERY = 16
ATTR = "_wait_fuse_readable"


class EagerWait:
    def __init__(
        self, fuse_module: ModuleType, spin_us: int = SPIN_US, busy: Callable[[], bool] = lambda: False
    ) -> None:
        self._module = fuse_module
        self._busy = busy
        self._spin_ns = max(0, spin_us) * 1000
        self._original: Callable[[], Awaitable[Any]] | None = None
        self._poller = select.poll()
        self._fd = -1
        self._run = 0
        self._hit_rate = 1.0
        self._since_probe = 0
        self.taken = 0  # requests taken without the original wait
        self.waited = 0  # requests that went through the original wait
        self._queued: Callable[[], int] = _queued_by_statistics

    def install(self) -> bool:
        """Swap pyfuse3's wait for ours; False (nothing changed) when that is not possible."""
        original = getattr(self._module, ATTR, None)
        if original is None or not fusehook.loaded():
            return False
        fusehook.forget_session()  # a descriptor of an earlier session of this process is stale
        self._queued = _queued_counter()
        self._original = original
        setattr(self._module, ATTR, self.wait)
        return True

    def uninstall(self) -> None:
        if self._original is not None and getattr(self._module, ATTR, None) == self.wait:
            setattr(self._module, ATTR, self._original)
        self._original = None
        if self._fd >= 0:
            self._poller.unregister(self._fd)
            self._fd = -1
        log.info("requests taken as they arrived: %d, after trio's wait: %d", self.taken, self.waited)

    def _ready(self) -> bool:
        events = self._poller.poll(0)
        return bool(events) and not events[0][1] & select.POLLNVAL

    def _quiet(self) -> bool:
        """No thread result is waiting to be delivered (a decoded block a read awaits)."""
        return self._queued() == 0

    def _worth_spinning(self) -> bool:
        """Polling may go on: nothing else wants this thread or the GIL.

        Not while worker threads decode (readahead, parallel readers): each poll and yield
        hands them the GIL and takes it back, and their results soon need this thread anyway.
        """
        return self._queued() == 0 and not self._busy()

    def _polled(self, found: bool) -> None:
        self._hit_rate += ((1.0 if found else 0.0) - self._hit_rate) / 8

    def _worth_polling(self) -> bool:
        if self._hit_rate >= MIN_HIT_RATE:
            return True
        self._since_probe += 1
        if self._since_probe < PROBE_EVERY:
            return False
        self._since_probe = 0
        return True

    async def wait(self) -> Any:
        if self._fd < 0 and (fd := fusehook.session_fd()) >= 0:
            self._poller.register(fd, select.POLLIN)
            self._fd = fd
        if self._fd >= 0 and self._run < EAGER_RUN and self._quiet():
            ready = self._ready()
            if not ready and self._spin_ns and not self._busy() and self._worth_polling():
                until = time.perf_counter_ns() + self._spin_ns
                while not (ready := self._ready()) and time.perf_counter_ns() < until and self._worth_spinning():
                    os.sched_yield()  # a runnable thread on this CPU (the reader itself?) goes first
                self._polled(ready)
            if ready:
                self._run += 1
                self.taken += 1
                return True
        self._run = 0
        self.waited += 1
        assert self._original is not None
        return await self._original()


def _queued_by_statistics() -> int:
    return trio.lowlevel.current_statistics().run_sync_soon_queue_size


def _queued_counter() -> Callable[[], int]:
    """The cheapest way to count trio's queued thread results, in the running trio loop.

    ``trio.lowlevel.current_statistics()`` counts them but also builds the I/O manager's
    statistics (a walk over every registered descriptor) and a result object: a profile of a
    serial small-file reader put 8-9 % of the FUSE thread's time there, since it runs on every
    request and on every turn of the polling loop. The same figure comes straight from the
    runner's entry queue (trio's own ``size()``, which current_statistics calls); that is a
    private attribute, so it is checked against the public figure and not used if it differs
    or is missing.
    """
    try:
        from trio._core._run_context import GLOBAL_RUN_CONTEXT

        size = GLOBAL_RUN_CONTEXT.runner.entry_queue.size
        if size() == _queued_by_statistics():
            return size
    except Exception:  # another trio version: keep the public way
        log.debug("trio's entry queue is not reachable; using current_statistics()", exc_info=True)
    return _queued_by_statistics


__all__ = ["EagerWait", "EAGER_RUN", "SPIN_US"]
