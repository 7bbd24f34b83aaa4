"""A stop request that a signal handler can raise safely.

``threading.Event.set()`` takes the event's lock. A handler calling it runs in the main thread
between two bytecodes of whatever that thread was doing: if that was ``Event.wait`` or
``Event.set`` of the same event (an earlier signal's handler, still inside ``set``), the lock is
already held by this very thread and the handler waits for it forever. A batch job killed at
its time limit gets SIGTERM from Slurm and from its parent process within microseconds, so
this happens (a refresh hung until Slurm's SIGKILL, without recording where it stopped).

:class:`StopFlag` takes no lock: ``set`` assigns a bool, ``wait`` sleeps in short slices.
"""

from __future__ import annotations

import time

POLL = 0.1  # seconds: how late a waiter may notice the flag


class StopFlag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the flag is set or *timeout* seconds passed; the flag's state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self._set
