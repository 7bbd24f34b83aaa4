"""Exclusive locks with a recorded owner; stale locks of dead processes are taken over.

A lock is an flock()ed file holding ``{"host", "pid", "time"}``. flock is released by the
kernel when the owner dies (SIGKILL included), so a lock file whose flock can be taken is
stale by definition; the recorded owner only serves messages ("already running (pid N)").
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BusyError


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int

    @classmethod
    def me(cls) -> LockOwner:
        return cls(socket.gethostname(), os.getpid())


def read_owner(path: str | os.PathLike[str]) -> LockOwner | None:
    try:
        with open(path) as f:
            d = json.load(f)
        return LockOwner(str(d["host"]), int(d["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Lock:
    """``with Lock(path, what="refresh of mr-rate"):`` — raises BusyError when held elsewhere."""

    def __init__(self, path: str | os.PathLike[str], what: str = "", owner: LockOwner | None = None) -> None:
        self.path = Path(path)
        self.what = what or self.path.name
        self.owner = owner or LockOwner.me()
        self._fd: int | None = None
        self.took_over_stale = False

    def acquire(self, wait: float = 0.0, poll: float = 0.05) -> None:
        """Take the lock; with *wait* > 0 keep trying that many seconds before BusyError."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._try_acquire()
            except BusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(poll)

    def _try_acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            prev = read_owner(self.path)
            who = f" (pid {prev.pid} on {prev.host})" if prev else ""
            raise BusyError(f"{self.what}: already running{who}") from None
        self.took_over_stale = os.fstat(fd).st_size > 0
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": self.owner.host, "pid": self.owner.pid, "time": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: str | os.PathLike[str]) -> bool:
    """True when a live process holds the lock at *path*."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
