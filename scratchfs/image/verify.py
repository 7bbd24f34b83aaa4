"""`scratchfs image verify`: decode every file of an image on all cores; optionally compare the
image with its source tree (names, types, sizes, modes, symlink targets, contents).

Contents are compared byte for byte against the source (stronger than comparing hashes and
cheaper: no hashing at all). Each worker thread calls ``Image.read`` on its own; the reader
gives every thread its own libsquashfs context. Work is cut into batches of consecutive small
files (they share fragment blocks, which then stay in the block cache) and ranges of big files.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotFoundError, UsageError
from ..units import format_size
from .manifest import ManifestError, read_manifest
from .progress import Reporter, Snapshot
from .scan import Excluder, display_path, walk

log = logging.getLogger(__name__)

RANGE = 32 << 20  # big files are cut into ranges of this many bytes (a multiple of every block size)
BATCH_BYTES = 8 << 20
BATCH_FILES = 256


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt, only-in-image, only-in-source, type, size, mode, symlink, content, unreadable-source, rdev
    path: bytes
    detail: str = ""

    def line(self) -> str:
        text = {
            "corrupt": "does not decode",
            "only-in-image": "only in image",
            "only-in-source": "only in source",
            "type": "type differs",
            "size": "size differs",
            "mode": "mode differs",
            "symlink": "symlink target differs",
            "content": "content differs",
            "unreadable-source": "unreadable in source",
            "rdev": "device number differs",
        }.get(self.kind, self.kind)
        return f"{text}: {display_path(self.path)}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyResult:
    image: str
    against: str | None
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    other: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    threads: int = 1
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def rate(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "against": self.against,
            "ok": self.ok,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "other": self.other,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.rate / 1e6, 1),
            "threads": self.threads,
            "problems": [{"kind": p.kind, "path": display_path(p.path), "detail": p.detail} for p in self.problems],
            "notes": self.notes,
        }


def format_result(r: VerifyResult) -> str:
    out = [p.line() for p in r.problems]
    out += [f"note: {n}" for n in r.notes]
    what = f"{r.files} files, {format_size(r.bytes_read)} in {r.seconds:.1f} s ({r.rate / 1e6:.0f} MB/s, {r.threads} threads)"
    if r.ok:
        out.append(f"OK: {what}" + (f"; matches {r.against}" if r.against else ""))
    else:
        out.append(f"FAILED: {len(r.problems)} problem{'s' if len(r.problems) != 1 else ''}; {what}")
    return "\n".join(out) + "\n"


@dataclass
class _Piece:
    rel: bytes
    inode: Any
    start: int
    end: int
    src: bytes | None  # full source path to compare with


def _pieces(files: list[tuple[bytes, Any, bytes | None]]) -> Iterator[list[_Piece]]:
    """Cut the work into batches: consecutive small files, or one range of a big file."""
    batch: list[_Piece] = []
    size = 0
    for rel, ino, src in files:
        if ino.size > RANGE:
            if batch:
                yield batch
                batch, size = [], 0
            for off in range(0, ino.size, RANGE):
                yield [_Piece(rel, ino, off, min(ino.size, off + RANGE), src)]
            continue
        batch.append(_Piece(rel, ino, 0, ino.size, src))
        size += ino.size
        if size >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while hi - lo > 64:  # binary search over halves that differ
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return n


def _failing_block(img: Any, inode: Any, off: int, n: int, err: Exception) -> tuple[int, Exception]:
    """The offset of the first block in [off, off+n) that does not decode, and its error."""
    from ..squashfs import SquashfsError

    bs = img.info.block_size
    for o in range(off, off + n, bs):
        try:
            img.read(inode, o, min(bs, off + n - o))
        except SquashfsError as e:
            return o, e
    return off, err


def _check_batch(img: Any, batch: list[_Piece], chunk: int) -> tuple[int, int, list[Problem]]:
    """Read (and compare) one batch; returns (files finished, bytes read, problems)."""
    from ..squashfs import SquashfsError

    done = 0
    nbytes = 0
    problems: list[Problem] = []
    for p in batch:
        fd = -1
        try:
            if p.src is not None:
                try:
                    fd = os.open(p.src, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as e:
                    problems.append(Problem("unreadable-source", p.rel, os.strerror(e.errno or 0)))
            off = p.start
            while off < p.end:
                n = min(chunk, p.end - off)
                try:
                    # without a source to compare with, a view of the cached block is enough (no copy)
                    data = img.read(p.inode, off, n) if fd >= 0 or not hasattr(img, "read_view") \
                        else img.read_view(p.inode, off, n)
                except SquashfsError as e:
                    at, err = _failing_block(img, p.inode, off, n, e)
                    problems.append(Problem("corrupt", p.rel, f"at byte {at}: {err}"))
                    break
                if len(data) != n:
                    problems.append(Problem("corrupt", p.rel, f"short read at byte {off}"))
                    break
                nbytes += n
                if fd >= 0:
                    try:
                        theirs = os.pread(fd, n, off)
                    except OSError as e:
                        problems.append(Problem("unreadable-source", p.rel, os.strerror(e.errno or 0)))
                        os.close(fd)
                        fd = -1
                    else:
                        if theirs != data:
                            at = off + _first_difference(data, theirs)
                            problems.append(Problem("content", p.rel, f"first difference at byte {at}"))
                            os.close(fd)
                            fd = -1
                off += n
        finally:
            if fd >= 0:
                os.close(fd)
        if p.end == p.inode.size:
            done += 1
    return done, nbytes, problems


def _expected_mode(st_mode: int, normalized: bool) -> int:
    if normalized and stat.S_ISDIR(st_mode):
        return 0o755
    if normalized and stat.S_ISREG(st_mode):
        return 0o644
    return stat.S_IMODE(st_mode)


def verify_image(
    image: str | os.PathLike[str],
    against: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    reporter: Reporter | None = None,
    cache_size: int = 64 << 20,
) -> VerifyResult:
    from ..squashfs import Image, SquashfsError

    if not os.path.lexists(image):
        raise NotFoundError(f"{image}: no such image")
    if against is not None:
        if not os.path.lexists(against):
            raise NotFoundError(f"{against}: no such source directory")
        if not os.path.isdir(against):
            raise UsageError(f"{against}: not a directory")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")
    nthreads = threads or os.cpu_count() or 1
    res = VerifyResult(image=os.fspath(image), against=None if against is None else os.fspath(against), threads=nthreads)
    t0 = time.monotonic()

    with Image.open(image, cache_size=cache_size) as img:
        entries: dict[bytes, Any] = {}
        try:
            for rel, ino in img.walk():
                entries[rel] = ino
        except SquashfsError as e:
            res.problems.append(Problem("corrupt", b"", f"directory tree: {e}"))
        has_xattrs = img.info.has_xattrs
        chunk = max(img.info.block_size, 1 << 20)

        src_root = os.fsencode(against) if against is not None else None
        source: dict[bytes, os.stat_result] = {}
        normalized = False
        if src_root is not None:
            excludes: list[str] = []
            try:
                m = read_manifest(image)
            except ManifestError as e:
                log.warning("ignoring the manifest: %s", e)
                m = None
            if m is not None:
                excludes = list(m.options.get("excludes") or [])
                normalized = bool(m.options.get("normalize_permissions"))
                if excludes:
                    res.notes.append(f"source entries matching the build's excludes are not compared: {excludes}")
            for ent in walk(src_root, Excluder(excludes),
                            on_error=lambda rel, why: res.problems.append(Problem("unreadable-source", rel, why))):
                source[ent.rel] = ent.st

        # Metadata first (cheap, single thread), then file data on all cores.
        work: list[tuple[bytes, Any, bytes | None]] = []
        seen_ino: dict[int, bytes] = {}
        links_src: dict[tuple[int, int], int] = {}
        for rel, ino in entries.items():
            if has_xattrs:
                try:
                    img.xattrs(ino)
                except SquashfsError as e:
                    res.problems.append(Problem("corrupt", rel, f"xattrs: {e}"))
            if ino.is_dir:
                if rel:
                    res.dirs += 1
            elif ino.is_symlink:
                res.symlinks += 1
            elif not ino.is_file:
                res.other += 1
            st = source.get(rel) if src_root is not None else None
            if src_root is not None:
                if st is None:
                    if rel.rpartition(b"/")[0] in source:
                        res.problems.append(Problem("only-in-image", rel))  # the top of a missing subtree only
                    continue
                if stat.S_IFMT(st.st_mode) != stat.S_IFMT(ino.mode):
                    res.problems.append(Problem("type", rel, f"source {stat.filemode(st.st_mode)[0]}, "
                                                              f"image {stat.filemode(ino.mode)[0]}"))
                    continue
                want = _expected_mode(st.st_mode, normalized)
                if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(ino.mode) != want:
                    res.problems.append(Problem("mode", rel, f"source {want:04o}, image {stat.S_IMODE(ino.mode):04o}"))
                if ino.is_symlink:
                    target = os.readlink(os.path.join(src_root, rel))
                    if img.readlink(ino) != target:
                        res.problems.append(Problem("symlink", rel, f"source -> {display_path(target)}, "
                                                                    f"image -> {display_path(img.readlink(ino))}"))
                elif (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and st.st_rdev != ino.rdev:
                    res.problems.append(Problem("rdev", rel))
            if not ino.is_file:
                continue
            if st is not None:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and links_src.setdefault(key, ino.ino) != ino.ino:
                    res.notes.append(f"hard link not kept: {display_path(rel)} is a separate file in the image")
                if st.st_size != ino.size:
                    res.problems.append(Problem("size", rel, f"source {st.st_size}, image {ino.size}"))
                    continue
            if ino.ino in seen_ino and (st is None or (st.st_nlink > 1 and links_src[(st.st_dev, st.st_ino)] == ino.ino)):
                continue  # another name of data already queued (and of the same source file)
            seen_ino[ino.ino] = rel
            res.files += 1
            src_path = os.path.join(src_root, rel) if src_root is not None else None
            work.append((rel, ino, src_path))
        if src_root is not None:
            res.problems.extend(
                Problem("only-in-source", rel)
                for rel in source
                if rel not in entries and rel.rpartition(b"/")[0] in entries
            )

        total_bytes = sum(ino.size for _, ino, _ in work)
        files_done = 0
        t_data = time.monotonic()
        with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="verify") as pool:
            pending: set[Future[tuple[int, int, list[Problem]]]] = set()
            batches = _pieces(work)
            exhausted = False
            while True:
                while not exhausted and len(pending) < nthreads * 4:
                    b = next(batches, None)
                    if b is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(_check_batch, img, b, chunk))
                if not pending:
                    break
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in finished:
                    d, n, probs = f.result()
                    files_done += d
                    res.bytes_read += n
                    res.problems.extend(probs)
                if reporter:
                    now = time.monotonic()
                    reporter.update(Snapshot(files_done, res.files, res.bytes_read, total_bytes, now - t_data), now)
        if reporter:
            reporter.finish(Snapshot(files_done, res.files, res.bytes_read, total_bytes, time.monotonic() - t_data))
    res.seconds = time.monotonic() - t0
    res.problems.sort(key=lambda p: (p.path, p.kind))
    return res
