"""Copying an image to the node-local cache: bandwidth-limited, verified, crash-safe.

:func:`copy_image` runs in a worker thread (it blocks). It reads the source image
sequentially, writes a temp file the caller named (and recorded, so a crash leaves nothing
unknown behind), hashes what it read with the image manifest's tree checksum, writes it
back to the disk as it goes (:class:`Writeback`), fsyncs the temp file, drops it from the
page cache and hashes it again *from the disk*: the copy is accepted only when what was
written is what was read (and, when the image has a manifest that still describes it, what
the manifest says). The source must not change while copying
(size, mtime and superblock are compared before and after). Only then is the temp file
linked to its final name (never over an existing file) and the directory fsynced.

On any failure or cancellation the temp file is removed and :class:`CopyError` raised; the
caller retries with backoff and keeps serving from the source meanwhile.  A caller that passes
a :class:`Partial` keeps a cancelled copy instead: the temp file stays, the Partial holds how
far it got (bytes and the hashes of what was read), and a later call with the same Partial
goes on from there if the source and the temp file are as they were (else it starts over).
The checks are the same as for a copy made in one go: the digest of everything read, in both
calls, against the whole temp file read back from the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ScratchfsError
from .image.manifest import (
    CHECKSUM_ALGORITHM,
    CHUNK,
    LEGACY_ALGORITHM,
    SUPERBLOCK_SIZE,
    image_checksum,
    new_hash,
    read_manifest,
    tree_digest,
)
from .state import sync_dir

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # bytes per read of the source
PACED_READ_MIN = 128 << 10  # the smallest read of a bandwidth-limited copy
PACED_READ_TIME = 0.005  # a bandwidth-limited copy reads about this many seconds' worth at a time
assert CHUNK % READ_SIZE == 0 and READ_SIZE % PACED_READ_MIN == 0


def read_size(bandwidth: float) -> int:
    """Bytes per read of a copy at *bandwidth* bytes/s (0 = unlimited).

    A limited copy reads little at a time, about ``PACED_READ_TIME`` worth (a power of two
    from ``PACED_READ_MIN`` to ``READ_SIZE``): a read of the source queues that many bytes on
    scratch's link at once, and another dataset's read arriving just after it waits for them.
    An unlimited copy takes the link anyway and reads ``READ_SIZE`` at a time.
    """
    if bandwidth <= 0:
        return READ_SIZE
    size = PACED_READ_MIN
    while size * 2 <= min(bandwidth * PACED_READ_TIME, READ_SIZE):
        size *= 2
    return size


class CopyError(ScratchfsError):
    exit_code = 9


class CopyCancelled(CopyError):
    pass


@dataclass(frozen=True)
class Identity:
    """What says "this is still the same image file": size, mtime and the superblock bytes."""

    size: int
    mtime_ns: int
    superblock: str  # hex

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Identity:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            sb = f.read(SUPERBLOCK_SIZE)
        return cls(st.st_size, st.st_mtime_ns, sb.hex())

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "superblock": self.superblock}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Identity:
        return cls(int(d["size"]), int(d["mtime_ns"]), str(d["superblock"]))  # type: ignore[call-overload]


class Progress:
    """Shared between the copying thread (writer) and the daemon (reader); plain ints only."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.done = 0
        self.resumed = 0  # bytes a cancelled copy had done when this one went on from it
        self.phase = "queued"  # queued, copying, verifying, done, failed
        self.started = time.monotonic()

    def rate(self) -> float:
        """Bytes/s copied since the job was created."""
        return (self.done - self.resumed) / max(time.monotonic() - self.started, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "bytes_done": self.done,
            "bytes_total": self.total,
            "fraction": (self.done / self.total) if self.total else 0.0,
            "rate": self.rate(),
        }


@dataclass
class Partial:
    """How far a cancelled copy got: its temp file holds the first ``pos`` bytes of the source
    as it was (``identity``); ``digests`` and ``piece`` hash what was read (see copy_image)."""

    identity: Identity | None = None
    pos: int = 0
    digests: list[bytes] = field(default_factory=list)
    piece: Any = None  # hash of the bytes read since the last whole CHUNK (pos % CHUNK of them)

    def resumable(self, ident: Identity, tmp: Path) -> bool:
        """Whether a copy of the source now known as *ident* can go on from here."""
        if self.identity != ident or self.piece is None or self.pos <= 0:
            return False
        try:
            return os.stat(tmp).st_size == self.pos
        except OSError:
            return False


@dataclass(frozen=True)
class CopyResult:
    path: Path
    size: int
    checksum: str  # tree checksum of the content (image.manifest.CHECKSUM_ALGORITHM)
    identity: Identity  # of the source, as copied


class Throttle:
    """At most *rate* bytes/s (0 = unlimited), averaged over the copy so far, but with no
    catching up: a copy slowed down by its source (scratch busy serving readers) runs ahead
    of its schedule by at most *burst* seconds' worth of bytes. Otherwise it would make up for
    the lost time at full speed, starving those readers of the shared scratch bandwidth
    (this is what stalled readers just before a promotion on throttled scratch).

    ``clock`` and ``wait`` (which returns True when the copy is cancelled) are injectable;
    by default the monotonic clock and the cancel event's wait.
    """

    def __init__(
        self,
        rate: float,
        cancel: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        burst: float = 0.05,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.wait = wait or cancel.wait
        self.start = clock()
        self.sent = 0

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.rate <= 0:
            return
        now = self.clock()
        due = self.start + self.sent / self.rate
        if due < now - self.burst:  # behind schedule: forget the time lost, keep the rate
            self.start += now - self.burst - due
            due = now - self.burst
        left = due - now
        if left > 0 and self.wait(left):
            raise CopyCancelled("copy cancelled")


def _drop_page_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# sync_file_range(2) flags (linux/fs.h)
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class Writeback:
    """Keeps what a copy has written but not yet stored to a piece or two, out of the page cache.

    Without it a copy is all dirty pages until its final fsync (the kernel starts writing back
    only past ``dirty_background_ratio`` of memory, gigabytes), which then writes it all at
    once: the local disk is busy for that long and every read queued on it waits, readers of
    cached datasets included. And a copy of a large image fills the page cache, pushing out
    what readers were using, with data that is read next only to verify it (from the disk).

    So every ``piece`` bytes written, writeback of those bytes starts (``sync_file_range``,
    asynchronous), the piece before is waited for and dropped from the page cache. The final
    fsync is left with little to do. Without ``sync_file_range`` (not Linux) it does nothing.
    """

    def __init__(self, fd: int, piece: int = CHUNK) -> None:
        self.fd = fd
        self.piece = piece
        self.started = 0  # writeback started for bytes [0, started)
        self.done = 0  # written back and dropped: [0, done)

    def __call__(self, written: int) -> None:
        """*written*: bytes written to the file so far."""
        if _sync_file_range is None or written - self.started < self.piece:
            return
        if _sync_file_range(self.fd, self.started, written - self.started, _SFR_WRITE) != 0:
            return  # not supported here: the final fsync does it all
        if self.started > self.done:
            flags = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
            if _sync_file_range(self.fd, self.done, self.started - self.done, flags) == 0:
                _drop_page_cache(self.fd, self.done, self.started - self.done)
                self.done = self.started
        self.started = written


def copy_image(
    src: str | os.PathLike[str],
    tmp: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    bandwidth: float = 0.0,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    verify_threads: int | None = 1,
    room: Callable[[int], int] | None = None,
    partial: Partial | None = None,
) -> CopyResult:
    """Copy *src* to *tmp*, verify, link to *dst* (see the module docstring). Blocking.

    *room*, if given, is called before bytes are written beyond what it last allowed, with the
    number of bytes about to be written: it makes room for them (mountd deletes reclaimable
    copies) and returns how many bytes may be written before it is asked again.

    *partial*, if given, makes a cancelled copy resumable: on :class:`CopyCancelled` the temp
    file is left (the caller deletes it, or calls again with the same *partial* to go on).
    """
    cancel = cancel or threading.Event()
    progress = progress or Progress()
    src, tmp, dst = Path(src), Path(tmp), Path(dst)
    try:
        ident = Identity.of(src)
    except OSError as e:
        raise CopyError(f"cannot read {src}: {e.strerror}") from None
    progress.total = ident.size
    progress.phase = "copying"
    manifest = None
    with contextlib.suppress(ScratchfsError, OSError):
        manifest = read_manifest(src)
    resume = partial is not None and partial.resumable(ident, tmp)
    fin = fout = -1
    pos = 0
    copying = False
    try:
        fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        if resume:
            assert partial is not None
            fout = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            pos, digests, piece = partial.pos, partial.digests, partial.piece
            os.lseek(fin, pos, os.SEEK_SET)
            os.lseek(fout, pos, os.SEEK_SET)
            log.info("going on with the copy of %s at %d of %d bytes", src, pos, ident.size)
        else:
            if partial is not None:  # nothing to go on from: start over
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            digests, piece = [], new_hash()
        in_piece = pos % CHUNK
        progress.done = progress.resumed = pos
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fin, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        throttle = Throttle(bandwidth, cancel)
        writeback = Writeback(fout)
        writeback.started = writeback.done = pos
        view = memoryview(bytearray(read_size(bandwidth)))
        allowed = 0  # bytes that may be written before room is asked again
        copying = True  # pos, digests and piece agree with what the temp file holds
        while True:
            if cancel.is_set():
                raise CopyCancelled("copy cancelled")
            # never past the end of a CHUNK piece (a resumed copy may not start on a read boundary)
            n = os.readv(fin, [view if in_piece + len(view) <= CHUNK else view[: CHUNK - in_piece]])
            if n == 0:
                break
            if room is not None and n > allowed:
                allowed = room(n)
            allowed -= n
            chunk = view[:n]
            piece.update(chunk)
            in_piece += n
            if in_piece == CHUNK:
                digests.append(piece.digest())
                piece, in_piece = new_hash(), 0
            written = 0
            while written < n:
                written += os.write(fout, chunk[written:])
            pos += n
            progress.done = pos
            writeback(pos)
            throttle(n)
        copying = False
        if in_piece or not digests:
            digests.append(piece.digest())
        checksum = tree_digest(digests)
        if pos != ident.size:
            raise CopyError(f"{src} changed size while copying ({ident.size} → {pos} bytes)")
        os.fsync(fout)
        _drop_page_cache(fout)
        os.close(fout)
        fout = -1
        _drop_page_cache(fin)
        os.close(fin)
        fin = -1
        try:
            after = Identity.of(src)
        except OSError as e:
            raise CopyError(f"{src} went away while copying: {e.strerror}") from None
        if after != ident:
            raise CopyError(f"{src} changed while copying")
        progress.phase = "verifying"
        if cancel.is_set():
            raise CopyCancelled("copy cancelled")
        written_sum = image_checksum(tmp, verify_threads)
        if written_sum != checksum:
            raise CopyError(f"verification failed: {tmp} does not hold what was read from {src}")
        if (
            manifest is not None
            and manifest.checksum
            and manifest.checksum_algorithm == CHECKSUM_ALGORITHM
            and manifest.image_bytes == ident.size
            and manifest.image_mtime_ns == ident.mtime_ns
            and manifest.superblock_hex == ident.superblock
            and manifest.checksum != checksum
        ):
            raise CopyError(f"{src} does not match its manifest checksum (damaged on scratch?)")
        try:
            os.link(tmp, dst)  # never replaces an existing file
        except FileExistsError:
            raise CopyError(f"{dst} exists already") from None
        os.unlink(tmp)
        sync_dir(dst.parent)
        progress.phase = "done"
        return CopyResult(dst, pos, checksum, ident)
    except BaseException as e:
        progress.phase = "failed"
        for fd in (fin, fout):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if isinstance(e, CopyCancelled) and partial is not None and copying and pos > 0:
            partial.identity, partial.pos, partial.digests, partial.piece = ident, pos, digests, piece
            raise  # the temp file stays, to go on from
        if partial is not None:
            partial.pos = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CopyError(f"copying {src} to {tmp}: {e.strerror or e}") from None
        raise


def verify_copy(path: str | os.PathLike[str], checksum: str, threads: int | None = 1) -> bool:
    """True when the file at *path* still hashes to *checksum* (read from the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        _drop_page_cache(fd)
    finally:
        os.close(fd)
    # A record written before the switch to xxh3 holds a 64-digit sha256-tree checksum.
    algorithm = LEGACY_ALGORITHM if len(checksum) == 64 else CHECKSUM_ALGORITHM
    try:
        return image_checksum(path, threads, algorithm=algorithm) == checksum
    except (OSError, ScratchfsError):
        return False
