"""Setting a file's access time to now while keeping its modification time.

The portable way is ``os.utime(name, ns=(now_ns, st.st_mtime_ns), dir_fd=fd,
follow_symlinks=False)`` after an ``lstat`` (method ``"utime"``). On Linux the same effect is
one ``utimensat(fd, name, {now, UTIME_OMIT}, AT_SYMLINK_NOFOLLOW)`` call (method
``"utimensat"``, the default where libc provides it): half the system calls, and no window in
which a write landing between the lstat and the utime would have its mtime rolled back. Both
set ctime as a side effect (the kernel does), both act on a symlink itself, never its target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable

UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_utimensat() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.utimensat
    except (OSError, AttributeError):
        return None
    # no argtypes: every call passes (int, bytes, byref(timespec[2]), int), which the default
    # conversions map to (int, const char *, struct timespec *, int) — and skip per-call checks
    fn.restype = ctypes.c_int
    return fn


_utimensat = _load_utimensat() if os.uname().sysname == "Linux" else None
METHODS = ("utimensat", "utime") if _utimensat is not None else ("utime",)
DEFAULT_METHOD = METHODS[0]

Toucher = Callable[[int, list[bytes]], list[tuple[bytes, int]]]


def make_toucher(now_ns: int, method: str = DEFAULT_METHOD) -> Toucher:
    """A function ``touch(dir_fd, names) -> [(name, errno), …]`` setting each entry's atime
    to *now_ns* with its mtime unchanged; the list holds the entries that failed.
    """
    if method == "utimensat":
        if _utimensat is None:
            raise ValueError("utimensat is not available here")
        times = (_Timespec * 2)(_Timespec(now_ns // 1_000_000_000, now_ns % 1_000_000_000), _Timespec(0, UTIME_OMIT))
        fn = _utimensat
        get_errno = ctypes.get_errno
        ptimes = ctypes.byref(times)

        def touch(dir_fd: int, names: list[bytes]) -> list[tuple[bytes, int]]:
            failed = []
            for name in names:
                if fn(dir_fd, name, ptimes, AT_SYMLINK_NOFOLLOW):
                    failed.append((name, get_errno()))
            return failed

        return touch
    if method == "utime":
        stat, utime = os.stat, os.utime

        def touch_portable(dir_fd: int, names: list[bytes]) -> list[tuple[bytes, int]]:
            failed = []
            for name in names:
                try:
                    st = stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    utime(name, ns=(now_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
                except OSError as e:
                    failed.append((name, e.errno or 0))
            return failed

        return touch_portable
    raise ValueError(f"unknown touch method {method!r} (known: {', '.join(METHODS)})")


def error_kind(err: int) -> str:
    """Short reason for an errno, as shown in error lists."""
    if err == errno.ENOENT:
        return "vanished"
    if err in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return os.strerror(err) if err else "error"
