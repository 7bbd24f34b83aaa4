"""The FUSE adapter: the only module that imports pyfuse3.

Inode numbers: a FUSE inode is ``(slot << 32) | squashfs inode number`` of the dataset in
that slot. Slot 0 is the single dataset of ``scratchfs mount``, whose root is swapped with
FUSE inode 1. (Namespaces of many datasets, as mountd serves, use slots >= 1 under a
synthetic root.) The kernel only asks about inodes it learnt from lookup/readdirplus, so
``_nodes`` holds exactly those, with their lookup counts, and forget() drops them: memory is
bounded by the kernel's inode cache, not by the image.

Errors: every handler is wrapped; a FUSEError passes, a known error becomes its errno
through ERRNO_TABLE, anything else is logged once with its traceback and becomes EIO. No
exception can end pyfuse3's main loop.

Requests stay on the trio thread while they are cheap (metadata, cached blocks). Reads of
file data are served by :class:`scratchfs.reading.Reader` (decoding in worker threads,
readahead), which knows nothing of FUSE.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

from . import fusehook  # before pyfuse3, so that its request hook takes effect

# isort: split
import pyfuse3
import trio

from . import fuseloop
from .namespace import Namespace
from .reading import Reader, ReadState
from .squashfs import CorruptImageError, ImageIOError, Inode, LibraryError, SquashfsError
from .squashfs.errors import NotSquashfsError, UnsupportedImageError
from .squashfs.inode import MODE_OF_TYPE
from .tiers import Dataset

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 24 * 3600.0  # images are immutable: let the kernel cache entries and attributes
ATTR_CACHE_ENTRIES = 200_000  # built attributes kept for readdir/lookup/getattr (cleared when full)
NS_TIMEOUT = 1.0  # the list of datasets of a namespace changes: entries of the root expire fast
# Before a demotion, mountd reads ahead on the scratch copy for at most this many open files
# being read (furthest read first; see read_positions and tiers.warm_copy).
WARM_FILES = 16
SWITCH_INTERVAL = 1e-4  # seconds; see serve()
SPIN_ENV = "SCRATCHFS_SPIN_US"
SLOT_SHIFT = 32
MASK32 = (1 << SLOT_SHIFT) - 1

# The one errno table: exception class → errno given to the kernel (first match wins).
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (LibraryError, errno.ENOMEM),  # libsquashfs could not allocate
    (UnsupportedImageError, errno.EOPNOTSUPP),
    (CorruptImageError, errno.EIO),
    (NotSquashfsError, errno.EIO),  # image replaced under us by something else
    (ImageIOError, errno.EIO),
    (SquashfsError, errno.EIO),
    (FileNotFoundError, errno.ESTALE),  # backing image vanished
)

# Basic regular file, device, fifo and socket inodes: the kernel's squashfs gives them no
# xattr operations, so listing their xattrs on an image without xattrs gives an empty list.
_PLAIN_INODE_TYPES = frozenset({2, 4, 5, 6, 7})

_T = TypeVar("_T")
_P = ParamSpec("_P")


def errno_for(exc: BaseException) -> int:
    for cls, err in ERRNO_TABLE:
        if isinstance(exc, cls):
            return err
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


class _Node:
    __slots__ = ("dataset", "ref", "lookups", "stream")

    def __init__(self, dataset: Dataset | None, ref: int) -> None:
        self.dataset = dataset
        self.ref = ref
        self.lookups = 0
        self.stream: ReadState | None = None  # read state of the file in no-open mode


def _guard(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Turn every failure of a handler into a FUSEError (see module docstring)."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kw: _P.kwargs) -> _T:
        self = args[0]
        assert isinstance(self, Operations)
        args = args[1:]  # type: ignore[assignment]
        try:
            return await fn(self, *args, **kw)  # type: ignore[arg-type]
        except pyfuse3.FUSEError:
            raise
        except (SquashfsError, OSError) as e:
            self._report(fn.__name__, args, e)
            raise pyfuse3.FUSEError(errno_for(e)) from None
        except Exception as e:
            self._report(fn.__name__, args, e, unexpected=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    """Read-only FUSE operations over one dataset (slot 0) or a namespace of datasets."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        target: Dataset | Namespace,
        *,
        subdir: Inode | None = None,
        workers: int | None = None,
        readahead_bytes: int = 4 << 20,
        no_open: bool = True,
    ) -> None:
        super().__init__()
        # No-open mode (see fusehook): only for a single dataset. mountd retires a replaced
        # dataset once no file of it is open, which it can only tell from open handles.
        self._no_open = no_open and isinstance(target, Dataset) and fusehook.loaded()
        if isinstance(target, Dataset):
            self.ns = None
            self.dataset: Dataset | None = target
            self._root_inode: Inode | None = subdir or target.image.root
            self._root_sqfs = self._root_inode.ino
            self._nodes: dict[int, _Node] = {ROOT: _Node(target, self._root_inode.ref)}
        else:  # many datasets under a synthetic root directory
            self.ns = target
            self.dataset = None
            self._root_inode = None
            self._root_sqfs = -1
            self._nodes = {ROOT: _Node(None, 0)}
            target.listeners.append(self._namespace_changed)
        self._nodes[ROOT].lookups = 1
        self._handles: dict[int, ReadState] = {}
        self._declined: set[str] = set()
        self._attr_cache: dict[tuple[int, int], pyfuse3.EntryAttributes] = {}
        self._next_fh = 1
        # Datasets of a namespace (mountd) may be on slow scratch (see reading.SCRATCH_IO_THREADS).
        self.reader = Reader(workers=workers, scratch=self.ns is not None, readahead_bytes=readahead_bytes)
        self._reported: set[tuple[str, str]] = set()
        self._bad_lock = threading.Lock()
        self.bad_files: set[tuple[str, int]] = set()

    # ---------------------------------------------------------------- plumbing
    def close(self) -> None:
        self.reader.close()

    def _report(self, op: str, args: tuple[Any, ...], exc: BaseException, unexpected: bool = False) -> None:
        """Log a failure once per (operation, error kind, object); repeats go to DEBUG."""
        key = (op, f"{type(exc).__name__}:{args[0] if args else ''}")
        if key in self._reported:
            log.debug("%s%r failed again: %s", op, args[:1], exc)
            return
        if len(self._reported) < 100000:
            self._reported.add(key)
        if unexpected:
            log.error("unexpected error in %s%r, answering EIO", op, args[:1], exc_info=exc)
        else:
            log.warning("%s%r: %s (errno %d)", op, args[:1], exc, errno_for(exc))

    def _fuse_ino(self, ds: Dataset, sq: int) -> int:
        if ds.slot == 0:
            if sq == self._root_sqfs:
                return ROOT
            if sq == ROOT:
                return self._root_sqfs
        return (ds.slot << SLOT_SHIFT) | sq

    def _node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _inode(self, ino: int) -> tuple[Dataset, Inode]:
        node = self._node(ino)
        ds = node.dataset
        if ds is None:  # the synthetic root of a namespace: handlers deal with it first
            raise pyfuse3.FUSEError(errno.EISDIR)
        return ds, ds.image.inode_by_ref(node.ref)

    def _is_ns_root(self, ino: int) -> bool:
        return ino == ROOT and self.ns is not None

    def _ns_root_attrs(self) -> pyfuse3.EntryAttributes:
        ns = self.ns
        assert ns is not None
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.entry_timeout = a.attr_timeout = NS_TIMEOUT
        a.st_mode = stat.S_IFDIR | ns.mode
        a.st_nlink = 2 + len(ns)
        a.st_uid, a.st_gid = ns.uid, ns.gid
        a.st_size = 4096
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns.mtime * 1_000_000_000
        return a

    def _namespace_changed(self, name: str, old: Dataset | None, new: Dataset | None) -> None:
        """A dataset appeared, vanished or was replaced: make the kernel look it up again."""
        try:
            pyfuse3.invalidate_entry_async(ROOT, os.fsencode(name), ignore_enoent=True)
        except Exception:  # not mounted yet, or already unmounted
            log.debug("could not invalidate %s", name, exc_info=True)

    def read_positions(self, ds: Dataset, limit: int = WARM_FILES) -> list[tuple[Inode, int]]:
        """Where open files of *ds* are being read: (inode, end of the furthest read), at most
        *limit*, furthest read first; for warming another copy before readers switch to it."""
        pos = [(h.inode, h.next_off) for h in self._handles.values() if h.dataset is ds and h.next_off < h.inode.size]
        pos.sort(key=lambda p: -p[1])
        return pos[:limit]

    def open_handles(self, ds: Dataset) -> int:
        """Open files of *ds* (mountd closes a retired image only when this is 0)."""
        return sum(1 for h in self._handles.values() if h.dataset is ds)

    def _cached_attrs(self, ds: Dataset, n: Inode) -> pyfuse3.EntryAttributes:
        """Attributes of *n*, built once (images are immutable; pyfuse3 copies them out).

        Callers must not modify the returned object.
        """
        key = (ds.slot, n.ref)
        a = self._attr_cache.get(key)
        if a is None:
            if len(self._attr_cache) >= ATTR_CACHE_ENTRIES:
                self._attr_cache.clear()
            a = self._attr_cache[key] = self._attrs(ds, n)
        return a

    def _attrs(self, ds: Dataset, n: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._fuse_ino(ds, n.ino)
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = n.mode
        a.st_nlink = n.nlink
        a.st_uid = n.uid
        a.st_gid = n.gid
        a.st_rdev = n.rdev
        a.st_size = n.size
        a.st_blksize = 4096
        a.st_blocks = (n.size + 511) // 512
        t = n.mtime * 1_000_000_000
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def _remember(self, ds: Dataset, n: Inode, count: int = 1) -> int:
        ino = self._fuse_ino(ds, n.ino)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = _Node(ds, n.ref)
        node.lookups += count
        return ino

    # ---------------------------------------------------------------- metadata
    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if self._is_ns_root(parent_inode):
            return self._lookup_dataset(name)
        ds, parent = self._inode(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            child: Inode | None = parent
        elif name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel resolves '..' itself
        else:
            child = ds.image.lookup(parent, name)
        if child is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0  # negative entry, cached by the kernel for entry_timeout
            neg.entry_timeout = TIMEOUT
            return neg
        self._remember(ds, child)
        return self._cached_attrs(ds, child)

    def _lookup_dataset(self, name: bytes) -> pyfuse3.EntryAttributes:
        assert self.ns is not None
        ds = self.ns.get(os.fsdecode(name)) if name not in (b".", b"..") else None
        if ds is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = NS_TIMEOUT  # datasets come and go: cache absence briefly
            return neg
        root = ds.image.root
        self._remember(ds, root)
        a = self._attrs(ds, root)
        a.entry_timeout = NS_TIMEOUT
        return a

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self._nodes[ino]

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if self._is_ns_root(inode):
            return self._ns_root_attrs()
        ds, n = self._inode(inode)
        return self._cached_attrs(ds, n)

    @_guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        ds, n = self._inode(inode)
        if not n.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return n.target

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        if self._is_ns_root(inode):
            return inode
        ds, n = self._inode(inode)
        if not n.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self._no_open and fusehook.usable(fusehook.NO_OPENDIR_SUPPORT):
            # From now on the kernel sends no OPENDIR/RELEASEDIR and caches listings; the
            # hook puts the inode into each READDIR's file handle.
            self._decline("opendir")
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        fh &= ~fusehook.FH_INODE  # no-open mode: the hook's inode; else opendir's, the same
        if self._is_ns_root(fh):
            assert self.ns is not None
            datasets = self.ns.datasets()
            for i in range(start_id, len(datasets)):
                ds = datasets[i]
                root = ds.image.root
                if not pyfuse3.readdir_reply(token, os.fsencode(ds.name), self._attrs(ds, root), i + 1):
                    break
                self._remember(ds, root)
            return
        ds, d = self._inode(fh)
        img = ds.image
        lst = img.listing(d)
        refs = lst.refs
        names = lst.names
        if start_id >= len(names) and lst.error is not None:
            raise lst.error  # the listing broke off at damaged metadata: say so after its entries
        cache = self._attr_cache
        nodes = self._nodes
        slot = ds.slot
        for i in range(start_id, len(names)):
            ref = refs[i]
            a = cache.get((slot, ref))
            if a is None:
                try:
                    a = self._cached_attrs(ds, img.inode_by_ref(ref))
                except SquashfsError as e:
                    # As the kernel: list the name even if its inode is damaged; stat gives EIO.
                    self._report("readdir", (f"{ds.name}:{lst.inos[i]}",), e)
                    a = self._placeholder_attrs(ds, lst.inos[i], lst.types[i])
            if not pyfuse3.readdir_reply(token, names[i], a, i + 1):
                break
            node = nodes.get(a.st_ino)
            if node is None:
                node = nodes[a.st_ino] = _Node(ds, ref)
            node.lookups += 1

    def _placeholder_attrs(self, ds: Dataset, sq_ino: int, basic_type: int) -> pyfuse3.EntryAttributes:
        """Attributes for a listed entry whose inode cannot be decoded: never cached."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._fuse_ino(ds, sq_ino)
        a.entry_timeout = a.attr_timeout = 0
        a.st_mode = MODE_OF_TYPE.get(basic_type, stat.S_IFREG)
        a.st_nlink = 1
        return a

    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        datasets = [self.dataset] if self.dataset is not None else (self.ns.datasets() if self.ns else [])
        used = inodes = 0
        bsize = 4096
        for ds in datasets:
            u, i = ds.image.statfs_counts()
            used += u
            inodes += i
            bsize = ds.image.info.block_size
        s = pyfuse3.StatvfsData()
        s.f_bsize = bsize
        s.f_frsize = bsize
        s.f_blocks = (used + s.f_frsize - 1) // s.f_frsize
        s.f_bfree = s.f_bavail = 0
        s.f_files = inodes
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 256
        return s

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if self._is_ns_root(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        ds, n = self._inode(inode)
        value = ds.image.xattrs(n).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if self._is_ns_root(inode):
            return []
        ds, n = self._inode(inode)
        if not ds.image.info.has_xattrs and n.itype not in _PLAIN_INODE_TYPES:
            # As the kernel driver: inodes it gives xattr operations (directories, symlinks,
            # extended inodes) answer EOPNOTSUPP when the image has no xattr table.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return list(ds.image.xattrs(n))

    @_guard
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        self._node(inode)
        return True

    # -------------------------------------------------------------------- data
    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        ds, n = self._file(inode)
        if self._no_open and fusehook.usable(fusehook.NO_OPEN_SUPPORT):
            # From now on the kernel sends no OPEN/RELEASE (it checks modes itself, the mount
            # is read-only) and keeps file pages; reads carry the inode (see _stream).
            self._decline("open")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ReadState(ds, n)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False, nonseekable=False)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> Any:
        h = self._stream(fh ^ fusehook.FH_INODE) if fh & fusehook.FH_INODE else self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            return await self.reader.read(h, off, size)
        except SquashfsError as e:
            ds, n = h.dataset, h.inode
            with self._bad_lock:
                self.bad_files.add((ds.name, n.ino))
            self._report("read", (f"{ds.name}:{n.ino}",), e)
            raise pyfuse3.FUSEError(errno_for(e)) from None

    def _decline(self, op: str) -> None:
        """Answer ENOSYS: the kernel's no-open mode for *op* (logged the first time)."""
        if op not in self._declined:
            self._declined.add(op)
            log.info("no-open mode: the kernel stops sending %s and its release", op.upper())
        raise pyfuse3.FUSEError(errno.ENOSYS)

    def _stream(self, ino: int) -> ReadState:
        """The read state of file *ino* in no-open mode (kept until the kernel forgets it)."""
        node = self._node(ino)
        h = node.stream
        if h is None:
            h = node.stream = ReadState(*self._file(ino))
        return h

    def _file(self, ino: int) -> tuple[Dataset, Inode]:
        """The dataset and inode of regular file *ino* (EISDIR/EINVAL for anything else)."""
        ds, n = self._inode(ino)
        if not n.is_file:
            raise pyfuse3.FUSEError(errno.EISDIR if n.is_dir else errno.EINVAL)
        return ds, n

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # flush() is not overridden: pyfuse3's default answers ENOSYS, after which the kernel
    # stops sending FLUSH at all, saving a round trip on every close.

    # ---------------------------------------------- everything else: read-only
    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)


def mount_options(fsname: str, allow_other: bool = False, debug: bool = False) -> set[str]:
    opts = set(pyfuse3.default_options) - {"default_permissions"}
    opts |= {"ro", "nosuid", "nodev", "default_permissions", f"fsname={fsname}", "subtype=scratchfs"}
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


async def serve(
    ops: Operations,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[], None] | None = None,
    on_hup: Callable[[], None] | None = None,
    spin_us: int = fuseloop.SPIN_US,
) -> None:
    """Mount, serve until unmounted or SIGTERM/SIGINT, then unmount cleanly.

    SIGHUP calls *on_hup* (on the trio thread; mountd reloads its configuration), if given.
    *spin_us* is the default polling budget of the eager request wait (see fuseloop;
    negative: off); the environment variable SCRATCHFS_SPIN_US overrides it.
    """
    import signal
    import sys

    # Decode workers come back from every block (a ctypes call) needing the GIL, which the
    # trio thread mostly holds while requests stream in; with CPython's default 5 ms switch
    # interval they wait up to that long for it. Measured here: a 128 KiB zstd block took
    # 560 us of wall time to decode in the daemon against 200 us alone, and a cold 256 MiB
    # read went from 0.89 s to 0.76 s with 100 us.
    sys.setswitchinterval(SWITCH_INTERVAL)

    pyfuse3.init(ops, mountpoint, options)
    # Serial readers' next request is taken without a trip through trio's scheduler
    # (fuseloop); SCRATCHFS_SPIN_US sets the polling budget, a negative value turns it off.
    try:
        spin_us = int(os.environ.get(SPIN_ENV, "") or spin_us)
    except ValueError:
        log.warning("%s=%r is not a number of microseconds: using %d", SPIN_ENV, os.environ[SPIN_ENV], spin_us)
    eager = fuseloop.EagerWait(pyfuse3, spin_us, busy=ops.reader.decoding) if spin_us >= 0 else None
    if eager is not None and not eager.install():
        eager = None
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:

            async def announce() -> None:
                # A stat through the mount proves the loop serves; it must not run before main().
                await trio.to_thread.run_sync(os.stat, mountpoint)
                if on_ready is not None:
                    await trio.to_thread.run_sync(on_ready)

            nursery.start_soon(announce)

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for sig in sigs:
                        if sig == signal.SIGHUP:
                            if on_hup is not None:
                                on_hup()
                            continue
                        log.info("signal %d: unmounting %s", sig, mountpoint)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(watch_signals)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()
        unmounted = True
    finally:
        if eager is not None:
            eager.uninstall()
        pyfuse3.close(unmount=True)
        ops.close()
        log.info("%s %s", "unmounted" if unmounted else "stopped serving", mountpoint)


def is_fuse_supported() -> bool:
    return os.path.exists("/dev/fuse")


__all__ = ["Operations", "serve", "mount_options", "errno_for", "ERRNO_TABLE"]
