"""Walking a source tree: the pre-scan of a build and the source side of `verify --against`.

Paths are bytes relative to the root (names need not be UTF-8). Entries come in the order
mksquashfs reads them: depth first, each directory's entries sorted by name bytes, so the
cumulative byte counts of the scan can map "bytes read so far" to "files done".
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import stat
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A file counts as sparse when at least this many bytes of it are holes.
SPARSE_MIN_HOLE = 1 << 20


def display_path(rel: bytes) -> str:
    """A printable form of a relative path: UTF-8 where it is, backslash escapes elsewhere."""
    return rel.decode("utf-8", "backslashreplace") if rel else "."


class Excluder:
    """``--exclude`` patterns: without '/' a pattern matches a name at any depth; with '/' it
    matches the whole path relative to the source root (a leading '/' is ignored). A matched
    directory is left out with everything below it."""

    def __init__(self, patterns: Sequence[str | bytes] = ()) -> None:
        self.patterns = [p if isinstance(p, str) else os.fsdecode(p) for p in patterns]
        self._name: list[bytes] = []
        self._path: list[bytes] = []
        for p in self.patterns:
            raw = os.fsencode(p)
            if b"/" in raw.strip(b"/"):
                self._path.append(raw.strip(b"/"))
            else:
                self._name.append(raw.strip(b"/"))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, rel: bytes) -> bool:
        name = rel.rpartition(b"/")[2]
        return any(fnmatch.fnmatchcase(name, p) for p in self._name) or any(
            fnmatch.fnmatchcase(rel, p) for p in self._path
        )


@dataclass
class Entry:
    rel: bytes  # b"" for the root
    st: os.stat_result


@dataclass
class ScanResult:
    """Totals of a pre-scan plus what mksquashfs needs to be told and what progress needs."""

    files: int = 0
    dirs: int = 0  # the root not included
    symlinks: int = 0
    other: int = 0  # devices, fifos, sockets
    hardlinks: int = 0  # extra names of files already counted
    logical_bytes: int = 0  # apparent size of regular files, hard-linked data once
    sparse_files: int = 0
    newest_mtime: int = 0
    excluded: list[bytes] = field(default_factory=list)  # top-most excluded paths
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)
    # Cumulative data bytes after each file with data, in read order (for progress).
    cumulative: array = field(default_factory=lambda: array("q"))
    # Sizes of files (hard-linked data once), for choosing a block size.
    sizes: array = field(default_factory=lambda: array("q"))


def _readable(st: os.stat_result, full: bytes, euid: int, groups: set[int]) -> bool:
    """Can a regular file be opened for reading? Mode bits first (no syscall); os.access()
    confirms a 'no' (ACLs may allow). Directories are judged by listing them."""
    if euid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == euid:
        ok = bool(mode & stat.S_IRUSR)
    elif st.st_gid in groups:
        ok = bool(mode & stat.S_IRGRP)
    else:
        ok = bool(mode & stat.S_IROTH)
    return ok or os.access(full, os.R_OK, effective_ids=True)


def walk(
    root: bytes,
    excluder: Excluder | None = None,
    on_error: Callable[[bytes, str], None] | None = None,
    on_excluded: Callable[[bytes], None] | None = None,
) -> Iterator[Entry]:
    """Yield every entry under *root* (the root first), depth first, names sorted as bytes.

    Directories that cannot be listed are reported through *on_error* and not descended.
    """
    st = os.lstat(root)
    yield Entry(b"", st)
    stack: list[Iterator[tuple[bytes, os.stat_result | None]]] = []

    def listing(rel: bytes) -> Iterator[tuple[bytes, os.stat_result | None]]:
        full = os.path.join(root, rel) if rel else root
        try:
            with os.scandir(full) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            if on_error:
                on_error(rel, os.strerror(e.errno or errno.EIO))
            return
        for name in names:
            child = rel + b"/" + name if rel else name
            if excluder and excluder.excluded(child):
                if on_excluded:
                    on_excluded(child)
                continue
            try:
                cst = os.lstat(os.path.join(root, child))
            except FileNotFoundError:
                continue  # vanished while scanning
            except OSError as e:
                if on_error:
                    on_error(child, os.strerror(e.errno or errno.EIO))
                continue
            yield child, cst

    stack.append(listing(b""))
    while stack:
        try:
            child, cst = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        assert cst is not None
        yield Entry(child, cst)
        if stat.S_ISDIR(cst.st_mode):
            stack.append(listing(child))


def scan_source(root: bytes, excluder: Excluder | None = None) -> ScanResult:
    """Pre-scan a build source: counts, sizes, sparse files, unreadable entries, excludes."""
    res = ScanResult()
    euid = os.geteuid()
    groups = set(os.getgroups()) | {os.getegid()}
    seen_links: set[tuple[int, int]] = set()
    total = 0

    def err(rel: bytes, why: str) -> None:
        res.unreadable.append((rel, why))

    for e in walk(root, excluder, on_error=err, on_excluded=res.excluded.append):
        st = e.st
        mode = st.st_mode
        full = os.path.join(root, e.rel) if e.rel else root
        res.newest_mtime = max(res.newest_mtime, int(st.st_mtime))
        if stat.S_ISDIR(mode):
            if e.rel:
                res.dirs += 1
        elif stat.S_ISREG(mode):
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_links:
                    res.hardlinks += 1
                    continue
                seen_links.add(key)
            res.files += 1
            if not _readable(st, full, euid, groups):
                err(e.rel, os.strerror(errno.EACCES))
                continue
            res.logical_bytes += st.st_size
            res.sizes.append(st.st_size)
            if st.st_size - st.st_blocks * 512 >= SPARSE_MIN_HOLE:
                res.sparse_files += 1
            if st.st_size:
                total += st.st_size
                res.cumulative.append(total)
        elif stat.S_ISLNK(mode):
            res.symlinks += 1
        else:
            res.other += 1
    return res


def choose_block_size(sizes: Sequence[int], lo: int = 128 << 10, hi: int = 1 << 20) -> int:
    """Blocks as big as the files that hold most of the data.

    Take the byte-weighted median file size (half of all data lives in files at least this
    big), round it up to a power of two and clamp it to [lo, hi]. Datasets of big files get
    1 MiB blocks (fewer, larger decompressions; better ratio); datasets of small files get small
    blocks, so reading one small file does not decompress a 1 MiB fragment block.
    """
    total = sum(sizes)
    if total == 0:
        return hi
    acc = 0
    median = 0
    for s in sorted(sizes, reverse=True):
        acc += s
        if acc * 2 >= total:
            median = s
            break
    bs = lo
    while bs < median and bs < hi:
        bs <<= 1
    return min(max(bs, lo), hi)
