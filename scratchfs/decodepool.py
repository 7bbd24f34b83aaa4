"""Worker threads that decode image blocks, the blocks a reader waits for first.

A read that misses the block cache hands each missing block to the pool as a separate job,
so the blocks of one large read request decode on every core at once; readahead jobs queue
behind them. Jobs of one priority run in the order they were submitted (oldest first: the
kernel and readahead both ask for blocks in file order).

Priorities: :data:`DEMAND` (a read request waits for the block) before :data:`AHEAD`
(readahead). A job that has not started when the pool closes is cancelled (its ``cancel``
callable runs instead), so nothing claimed by it stays claimed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

DEMAND = 0
AHEAD = 1

Job = Callable[[], object]


class DecodePool:
    def __init__(self, workers: int, name: str = "sqfs") -> None:
        self._heap: list[tuple[int, int, Job, Job | None]] = []
        self._cv = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._closed = False
        self.workers = max(1, workers)
        self._submitted = 0  # jobs queued, ever (under the lock)
        self._finished = [0] * self.workers  # jobs run or cancelled, per worker (each writes its own)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, job: Job, cancel: Job | None = None) -> bool:
        """Queue *job*; False (and *cancel* run here) when the pool is closed."""
        with self._cv:
            if not self._closed:
                heapq.heappush(self._heap, (priority, next(self._seq), job, cancel))
                self._submitted += 1
                self._cv.notify()
                return True
        if cancel is not None:
            cancel()
        return False

    def busy(self) -> bool:
        """Jobs are queued or running (lock-free: each count has a single writer)."""
        return self._submitted != sum(self._finished)

    def _run(self, index: int) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, job, _ = heapq.heappop(self._heap)
            try:
                job()
            except Exception:  # a job reports its own errors; this only keeps the worker alive
                log.debug("decode job failed", exc_info=True)
            finally:
                self._finished[index] += 1

    def close(self, wait: bool = True) -> None:
        """Stop taking jobs, cancel the queued ones, and (with *wait*) join the workers."""
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._submitted -= len(pending)
            self._cv.notify_all()
        for _, _, _, cancel in pending:
            if cancel is not None:
                try:
                    cancel()
                except Exception:
                    log.debug("cancelling a decode job failed", exc_info=True)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
