"""Load the FUSE request hook (``_fusehook.c``) that lets the server use the kernel's no-open mode.

Import this module before pyfuse3 (fuse_ops does). The hook is a small shared library built
with the package; loaded with RTLD_GLOBAL, its ``fuse_session_process_buf`` takes the place of
libfuse's for pyfuse3, puts the inode into the file handle of READ/READDIR requests that carry
none, and passes every request on unchanged otherwise.

Why: a read-only server that answers OPEN and OPENDIR with ENOSYS makes the kernel stop sending
OPEN, RELEASE, OPENDIR and RELEASEDIR, keep file pages and cache directory listings. Warm small
files and warm directory walks then never reach Python. pyfuse3 gives read() and readdir() only
the file handle, which is 0 in that mode; the hook supplies the inode instead.

The hook also wraps ``fuse_session_receive_buf``: it makes the session's /dev/fuse descriptor
non-blocking and records it (:func:`session_fd`, which fuseloop polls to take the next request without a round
through trio's scheduler) and turns EAGAIN into EINTR, which pyfuse3 retries.

Without the library (not built, or loading failed) everything works as before, with an
open/release round trip per file: :func:`usable` says which mode a mount may use.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from .native import load_built

log = logging.getLogger(__name__)

FH_INODE = 1 << 62  # set by the hook in the file handle of a request that had none
# Kernel capability flags (FUSE_INIT): it accepts ENOSYS for OPEN / for OPENDIR.
NO_OPEN_SUPPORT = 1 << 17
NO_OPENDIR_SUPPORT = 1 << 24
DISABLE_ENV = "SCRATCHFS_NO_OPEN"  # "0": do not load the hook (open/release per file)


def _ready(lib: ctypes.CDLL) -> bool:
    for name in ("seen", "rewritten", "unreadable"):
        getattr(lib, f"scratchfs_hook_{name}").restype = ctypes.c_uint64
    lib.scratchfs_hook_kernel_flags.restype = ctypes.c_uint32
    if lib.scratchfs_hook_ready():
        return True
    log.debug("%s: libfuse3 not found through it", lib._name)
    return False


_lib = load_built(Path(__file__).resolve().parent, "_fusehook", DISABLE_ENV, _ready, mode=os.RTLD_GLOBAL)


def loaded() -> bool:
    return _lib is not None


def active() -> bool:
    """True once requests of this process demonstrably pass through the hook."""
    return _lib is not None and _lib.scratchfs_hook_seen() > 0 and not _lib.scratchfs_hook_unreadable()


def session_fd() -> int:
    """The /dev/fuse descriptor of this process's session once a request was read through the
    hook (non-blocking, and a read that finds nothing comes back as EINTR, not as an error);
    -1 before."""
    return _lib.scratchfs_hook_session_fd() if _lib is not None else -1


def forget_session() -> None:
    """Before a new session: the descriptor recorded for an earlier one is no longer valid."""
    if _lib is not None:
        _lib.scratchfs_hook_forget_session()


def usable(kernel_flag: int) -> bool:
    """May a handler answer ENOSYS now? Call it from inside a request handler (so the request
    itself went through the hook) with NO_OPEN_SUPPORT or NO_OPENDIR_SUPPORT."""
    return active() and bool(_lib is not None and _lib.scratchfs_hook_kernel_flags() & kernel_flag)


def counters() -> dict[str, int]:
    if _lib is None:
        return {}
    return {
        "seen": _lib.scratchfs_hook_seen(),
        "rewritten": _lib.scratchfs_hook_rewritten(),
        "unreadable": _lib.scratchfs_hook_unreadable(),
        "kernel_flags": _lib.scratchfs_hook_kernel_flags(),
    }


__all__ = ["FH_INODE", "NO_OPEN_SUPPORT", "NO_OPENDIR_SUPPORT", "loaded", "active", "usable", "counters", "session_fd", "forget_session"]
