"""Reading a squashfs image through libsquashfs.

Opening reads the superblock, the id table and the fragment table only. Inodes are read on
demand by reference (our inode table is keyed by inode reference, never by path); directory
listings and decoded inodes live in bounded LRU caches; data and fragment blocks are read
whole (pread + the image's decompressor, in one native call where ``_blockload.c`` is built)
into a bounded, shared :class:`BlockCache`.

Inodes and directories are decoded in Python from whole metadata blocks (pread + the image's
decompressor, a few hundred uncompressed blocks kept per image): a ctypes call costs more than
parsing an entry, and libsquashfs's readers take several calls per entry. That decoder accepts
only what libsquashfs's readers would read successfully, checking the same bounds; on anything
else (damage) it steps aside and libsquashfs's own readers decode the inode or directory, so
errors and partial listings come from one place.

Thread safety: libsquashfs reader objects are not thread-safe, so every thread gets its own
context (file handle, decompressor, metadata readers, xattr reader) on first use. What is
shared is immutable after open (superblock copy, id list, fragment table, which is only looked
up) or guarded by a lock (the caches).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import stat
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..native import load_built
from . import _lib as L
from ._lib import check, lib
from .cache import BlockCache
from .errors import CorruptImageError, ImageIOError, NotSquashfsError, SquashfsError, UnsupportedImageError

MODE_OF_TYPE = {
    1: stat.S_IFDIR,
    2: stat.S_IFREG,
    3: stat.S_IFLNK,
    4: stat.S_IFBLK,
    5: stat.S_IFCHR,
    6: stat.S_IFIFO,
    7: stat.S_IFSOCK,
}
log = logging.getLogger(__name__)

NO_FRAGMENT = 0xFFFFFFFF
XATTR_NONE = L.XATTR_NONE
_IMAGE_KEYS = itertools.count(1)


def _blockload_types(lib: ctypes.CDLL) -> bool:
    fn = lib.scratchfs_load_block
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    fn.restype = ctypes.c_int
    return True


_LOAD_OK, _LOAD_IO, _LOAD_SHORT, _LOAD_DECODE = 0, 1, 2, 3  # _blockload.c's results
# The block loader (_blockload.c, built with the package), or None: then each block takes an
# os.pread and a decompressor call (two hand-backs of the GIL instead of one).
# SCRATCHFS_BLOCKLOAD=0 turns it off (to compare).
_blockload = load_built(Path(__file__).resolve().parent, "_blockload", "SCRATCHFS_BLOCKLOAD", _blockload_types)
_load_block_native: Any = _blockload.scratchfs_load_block if _blockload is not None else None

# Field layouts of sqfs_inode_generic_t (little-endian x86/arm hosts; checked by tests):
# the 16-byte base + payload counters, then the type-specific union at offset 24.
_INODE_HEAD = struct.Struct("<HHHHIIII")
_FILE = struct.Struct("<IIII")
_FILE_EXT = struct.Struct("<QQQIIII")
_DIR = struct.Struct("<IIHHI")
_DIR_EXT = struct.Struct("<IIIIHHI")
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_U32X3 = struct.Struct("<III")
_DIR_ENTRY = struct.Struct("<HhHH")
_BASE = struct.Struct("<HHHHII")  # on-disk inode header: type, mode, uid idx, gid idx, mtime, number
_DIR_INDEX = struct.Struct("<III")  # start block, index, name size - 1 (then the name)
META = L.SQFS_META_BLOCK_SIZE
# On-disk bytes after the 16-byte header of each inode type, before any variable part.
_INODE_FIXED = {1: 16, 2: 16, 3: 8, 4: 8, 5: 8, 6: 4, 7: 4, 8: 24, 9: 40, 10: 8, 11: 12, 12: 12, 13: 8, 14: 8}
ABSENT = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class ImageInfo:
    compression: str
    block_size: int
    inode_count: int
    bytes_used: int
    mkfs_time: int
    fragment_count: int
    id_count: int
    has_fragments: bool
    has_xattrs: bool
    has_export_table: bool
    no_fragments: bool
    always_fragments: bool
    duplicates: bool
    version: str


class Inode:
    """A decoded inode: stat fields plus what reading its data needs. Immutable."""

    __slots__ = (
        "ino", "ref", "mode", "uid", "gid", "mtime", "size", "nlink", "rdev", "xattr_idx",
        "blocks_start", "block_words", "_block_offsets", "frag_index", "frag_offset", "frag_loc",
        "dir_block", "dir_offset", "dir_size", "target", "itype",
    )  # fmt: skip

    ino: int
    ref: int
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    nlink: int
    rdev: int
    xattr_idx: int
    blocks_start: int
    block_words: array[int] | None
    _block_offsets: list[int] | None
    frag_index: int
    frag_offset: int
    frag_loc: tuple[int, int] | None
    dir_block: int
    dir_offset: int
    dir_size: int
    target: bytes
    itype: int  # on-disk inode type (1-7 basic, 8-14 extended)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def block_offsets(self) -> list[int]:
        """Absolute on-disk offset of every data block (computed once)."""
        offs = self._block_offsets
        if offs is None:
            words = self.block_words or ()
            offs = list(accumulate((w & L.SQFS_BLOCK_SIZE_MASK for w in words), initial=self.blocks_start))
            self._block_offsets = offs
        return offs

    def __repr__(self) -> str:
        return f"<Inode {self.ino} ref={self.ref:#x} mode={self.mode:o} size={self.size}>"


class _Context:
    """One thread's libsquashfs objects. Never touched by another thread."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.file = lib.sqfs_open_file(os.fsencode(image.path), L.SQFS_FILE_OPEN_READ_ONLY)
        if not self.file:
            raise ImageIOError(f"{image.path}: cannot open image")
        self.cmp: Any = None
        self.inode_reader: Any = None
        self.dir_reader: Any = None
        self.xattr_reader: Any = None
        try:
            cfg = L.sqfs_compressor_config_t()
            sb = image._super
            check(
                lib.sqfs_compressor_config_init(
                    ctypes.byref(cfg), sb.compression_id, sb.block_size, L.SQFS_COMP_FLAG_UNCOMPRESS
                ),
                "compressor configuration",
            )
            self._keep: list[Any] = []
            if sb.compression_id == L.SQFS_COMP_LZO:
                cmp, self._keep = L.lzo.compressor()
                self._do_block = lambda _c, src, n, out, lim: L.lzo.decompress_into(src, n, out, lim)
            else:
                cmp = ctypes.POINTER(L.sqfs_compressor_t)()
                check(lib.sqfs_compressor_create(ctypes.byref(cfg), ctypes.byref(cmp)), "creating decompressor")
                self._do_block = cmp.contents.do_block
            self.cmp = cmp
            if sb.flags & L.SQFS_FLAG_COMPRESSOR_OPTIONS:
                check(cmp.contents.read_options(cmp, self.file), "reading compressor options")
            self.outbuf = ctypes.create_string_buffer(sb.block_size)
            self.native: tuple[Any, ...] | None = None
            if _load_block_native is not None and sb.compression_id != L.SQFS_COMP_LZO:
                # Arguments of _blockload.c for this thread: decompressor, do_block, buffers,
                # block size, and where it writes the length and the failure detail.
                self.inbuf = ctypes.create_string_buffer(sb.block_size)
                self.result = (ctypes.c_int32 * 2)()
                self.native = (
                    ctypes.cast(cmp, ctypes.c_void_p).value,
                    ctypes.cast(cmp.contents.do_block, ctypes.c_void_p).value,
                    ctypes.addressof(self.inbuf),
                    ctypes.addressof(self.outbuf),
                    sb.block_size,
                    ctypes.addressof(self.result),
                    ctypes.addressof(self.result) + 4,
                )
            self.metabuf = ctypes.create_string_buffer(META)
            self.reset_meta()
        except BaseException:
            self.close()
            raise

    def reset_meta(self) -> None:
        """(Re)create the metadata readers: after a decoding error their cached block is suspect."""
        sb = self.image._super
        for name in ("dir_reader", "inode_reader"):
            L.destroy(getattr(self, name, None))
            setattr(self, name, None)
        self.inode_reader = lib.sqfs_meta_reader_create(self.file, self.cmp, sb.inode_table_start,
                                                        sb.directory_table_start)  # fmt: skip
        self.dir_reader = lib.sqfs_meta_reader_create(self.file, self.cmp, sb.directory_table_start,
                                                      self.image._dir_table_end)  # fmt: skip
        if not self.inode_reader or not self.dir_reader:
            raise L.error_for(-1, "creating metadata readers")

    def load(self, fd: int, off: int, n: int) -> bytes:
        """Compressed data block of *n* bytes at *off*, read and decoded in one native call."""
        cmp, do_block, inbuf, outbuf, limit, length, detail = self.native  # type: ignore[misc]
        status = _load_block_native(fd, off, n, cmp, do_block, inbuf, outbuf, limit, length, detail)
        if status == _LOAD_OK:
            return ctypes.string_at(outbuf, self.result[0])
        path = self.image.path
        if status == _LOAD_IO:
            code = self.result[1]
            raise OSError(code, f"{os.strerror(code)}: reading {path} at {off}")
        if status == _LOAD_SHORT:
            raise ImageIOError(f"{path}: short read at {off} (image truncated?)")
        raise CorruptImageError(f"{path}: data block does not decompress ({self.result[1]})")

    def decompress(self, raw: bytes, limit: int) -> bytes:
        n = self._do_block(self.cmp, raw, len(raw), self.outbuf, limit)
        if n <= 0:
            raise CorruptImageError(f"{self.image.path}: data block does not decompress ({n})")
        return ctypes.string_at(self.outbuf, n)

    def decompress_meta(self, raw: bytes) -> bytes | None:
        """A metadata block's bytes, or None where libsquashfs's metadata reader fails too
        (same decompressor, same 8 KiB output limit; an empty block fails every read)."""
        n = self._do_block(self.cmp, raw, len(raw), self.metabuf, META)
        return ctypes.string_at(self.metabuf, n) if n > 0 else None

    def xattrs(self) -> Any:
        if self.xattr_reader is None:
            xr = lib.sqfs_xattr_reader_create(0)
            if not xr:
                raise L.error_for(-1, "creating xattr reader")
            try:
                check(
                    lib.sqfs_xattr_reader_load(xr, ctypes.byref(self.image._super), self.file, self.cmp),
                    f"{self.image.path}: reading xattr table",
                )
            except BaseException:
                L.destroy(xr)
                raise
            self.xattr_reader = xr
        return self.xattr_reader

    def close(self) -> None:
        for name in ("xattr_reader", "dir_reader", "inode_reader"):
            L.destroy(getattr(self, name, None))
            setattr(self, name, None)
        if self.cmp:
            if not getattr(self, "_keep", None):
                L.destroy(ctypes.cast(self.cmp, ctypes.c_void_p).value)
            self.cmp = None
        L.destroy(self.file)
        self.file = None


class _LRU(OrderedDict[Any, Any]):
    """A small count-bounded LRU map (callers hold the image's metadata lock)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def lookup(self, key: Any) -> Any:
        v = self.get(key)
        if v is not None:
            self.move_to_end(key)
        return v

    def store(self, key: Any, value: Any, weight: int = 1) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class DirListing:
    """A directory's entries in on-disk (sorted) order: names, inode refs, inode numbers."""

    __slots__ = ("names", "refs", "inos", "types", "index", "error")

    def __init__(self, names: list[bytes], refs: list[int], inos: list[int], types: list[int],
                 error: SquashfsError | None = None) -> None:  # fmt: skip
        self.names = names
        self.refs = refs
        self.inos = inos
        self.types = types  # basic inode type of each entry (1 dir, 2 file, 3 symlink, ...)
        self.index = {n: i for i, n in enumerate(names)}
        # Set when the listing broke off at damaged metadata: the entries before it are real,
        # whether more exist is unknown.
        self.error = error

    def __len__(self) -> int:
        return len(self.names)


class Image:
    """A squashfs image opened read-only. See the module docstring for threading rules."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        cache_size: int = 64 << 20,
        block_cache: BlockCache | None = None,
        inode_cache: int = 65536,
        dir_cache_entries: int = 262144,
        meta_cache_blocks: int = 512,
    ) -> None:
        self.path = Path(path)
        self._key = next(_IMAGE_KEYS)  # cache keys are (image key, offset): fds get reused
        self._closed = False
        self._tls = threading.local()
        self._contexts: list[_Context] = []
        self._ctx_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._frag_table: int | None = None
        self._frag_lookup = lib.sqfs_frag_table_lookup
        self._read_inode = lib.sqfs_meta_reader_read_inode
        self._readdir = lib.sqfs_meta_reader_readdir
        self._free = lib.sqfs_free
        self.cache = block_cache if block_cache is not None else BlockCache(cache_size)
        self._inodes = _LRU(inode_cache)
        self._dirs = _LRU(1 << 30)
        # Uncompressed metadata blocks: position → (bytes, position of the next block). Read
        # without the lock (one dict lookup); added under it, oldest first out.
        self._meta: dict[int, tuple[bytes, int]] = {}
        self._meta_limit = max(1, meta_cache_blocks)
        self._dir_entries = 0
        self._dir_entry_limit = dir_cache_entries
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SquashfsError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise NotSquashfsError(f"{self.path}: is a directory, not a squashfs image") from None
        except OSError as e:
            raise ImageIOError(f"{self.path}: {e.strerror}") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], cache_size: int = 64 << 20, **kw: Any) -> Image:
        return cls(path, cache_size=cache_size, **kw)

    # ----------------------------------------------------------------- opening
    def _open(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
            raise NotSquashfsError(f"{self.path}: not a regular file")
        self.file_size = st.st_size if stat.S_ISREG(st.st_mode) else _blockdev_size(self._fd)
        head = os.pread(self._fd, 4, 0)
        if head != b"hsqs":
            raise NotSquashfsError(f"{self.path}: not a squashfs image (no 'hsqs' magic)")
        if self.file_size < ctypes.sizeof(L.sqfs_super_t):
            raise CorruptImageError(f"{self.path}: truncated image ({self.file_size} bytes)")
        sb = L.sqfs_super_t()
        f = lib.sqfs_open_file(os.fsencode(self.path), L.SQFS_FILE_OPEN_READ_ONLY)
        if not f:
            raise ImageIOError(f"{self.path}: cannot open image")
        try:
            check(lib.sqfs_super_read(ctypes.byref(sb), f), f"{self.path}: superblock")
        finally:
            L.destroy(f)
        self._super = sb
        self._super_ptr = ctypes.pointer(sb)
        self._validate_super()
        # Plain ints for the inode decoder (a ctypes field read costs more than a tuple's).
        self._inode_table = (sb.inode_table_start, sb.directory_table_start, sb.block_size)
        ctx = self._ctx()
        self._ids = self._read_ids(ctx)
        if sb.fragment_entry_count and sb.fragment_table_start != ABSENT:
            tbl = lib.sqfs_frag_table_create(0)
            if not tbl:
                raise L.error_for(-1, "creating fragment table")
            self._frag_table = tbl
            check(
                lib.sqfs_frag_table_read(tbl, ctx.file, ctypes.byref(sb), ctx.cmp),
                f"{self.path}: fragment table",
            )
        self._advise_metadata()
        self.root = self.inode_by_ref(sb.root_inode_ref)
        if not self.root.is_dir:
            raise CorruptImageError(f"{self.path}: root inode is not a directory")
        self.info = ImageInfo(
            compression=L.COMPRESSORS.get(sb.compression_id, str(sb.compression_id)),
            block_size=sb.block_size,
            inode_count=sb.inode_count,
            bytes_used=sb.bytes_used,
            mkfs_time=sb.modification_time,
            fragment_count=sb.fragment_entry_count,
            id_count=sb.id_count,
            has_fragments=bool(sb.fragment_entry_count),
            has_xattrs=sb.xattr_id_table_start != ABSENT and not sb.flags & L.SQFS_FLAG_NO_XATTRS,
            has_export_table=sb.export_table_start != ABSENT and bool(sb.flags & L.SQFS_FLAG_EXPORTABLE),
            no_fragments=bool(sb.flags & L.SQFS_FLAG_NO_FRAGMENTS),
            always_fragments=bool(sb.flags & L.SQFS_FLAG_ALWAYS_FRAGMENTS),
            duplicates=not sb.flags & L.SQFS_FLAG_NO_DUPLICATES,
            version=f"{sb.version_major}.{sb.version_minor}",
        )

    def _advise_metadata(self, limit: int = 256 << 20) -> None:
        """Ask the kernel to read the metadata tables ahead (they sit at the end of the image).

        Lookups then decode inodes and directories from the page cache instead of waiting on
        scratch for each 8 KiB metadata block. Asynchronous; bounded by *limit* bytes.
        """
        start = self._super.inode_table_start
        length = min(self._super.bytes_used - start, limit)
        if length > 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                log.debug("posix_fadvise failed on %s", self.path, exc_info=True)

    def _validate_super(self) -> None:
        sb = self._super
        p = self.path
        if sb.compression_id not in L.COMPRESSORS:
            raise UnsupportedImageError(f"{p}: unknown compressor id {sb.compression_id}")
        if sb.bytes_used > self.file_size:
            raise CorruptImageError(
                f"{p}: truncated image: superblock says {sb.bytes_used} bytes, file has {self.file_size}"
            )
        if sb.inode_count == 0:
            raise CorruptImageError(f"{p}: superblock says the image has no inodes")
        if not (ctypes.sizeof(L.sqfs_super_t) <= sb.inode_table_start < sb.directory_table_start < sb.bytes_used):
            raise CorruptImageError(f"{p}: inode/directory table offsets out of order or beyond the image")
        for name in ("id_table_start", "fragment_table_start", "export_table_start", "xattr_id_table_start"):
            v = getattr(sb, name)
            if v != ABSENT and v > sb.bytes_used:
                raise CorruptImageError(f"{p}: {name.replace('_', ' ')} beyond the end of the image")
        if sb.fragment_entry_count > self.file_size // 16 + 1:
            raise CorruptImageError(f"{p}: absurd fragment count {sb.fragment_entry_count}")
        # Every inode takes >= 20 bytes of an 8 KiB metadata block, and a compressed block
        # takes >= 3 bytes on disk: more inodes than that cannot be in the inode table.
        max_inodes = (sb.directory_table_start - sb.inode_table_start) // 3 * (8192 // 20) + 8192 // 20
        if sb.inode_count > max_inodes:
            raise CorruptImageError(f"{p}: absurd inode count {sb.inode_count} for its inode table")
        if sb.export_table_start != ABSENT and sb.flags & L.SQFS_FLAG_EXPORTABLE:
            index_bytes = -(-sb.inode_count // 1024) * 8  # one pointer per 8 KiB block of refs
            nxt = min([v for v in (sb.id_table_start, sb.xattr_id_table_start, sb.bytes_used)
                       if v != ABSENT and v > sb.export_table_start] or [sb.bytes_used])  # fmt: skip
            if sb.export_table_start + index_bytes > nxt:
                raise CorruptImageError(f"{p}: inode count {sb.inode_count} does not fit the export table")
        if (sb.root_inode_ref >> 16) >= sb.directory_table_start - sb.inode_table_start:
            raise CorruptImageError(f"{p}: root inode reference outside the inode table")
        later = [
            v
            for v in (sb.fragment_table_start, sb.export_table_start, sb.id_table_start, sb.xattr_id_table_start)
            if v != ABSENT and v > sb.directory_table_start
        ]
        self._dir_table_end = min(later) if later else sb.bytes_used

    def _read_ids(self, ctx: _Context) -> list[int]:
        sb = self._super
        if sb.id_count == 0:
            raise CorruptImageError(f"{self.path}: id table is empty")
        tbl = lib.sqfs_id_table_create(0)
        if not tbl:
            raise L.error_for(-1, "creating id table")
        try:
            check(lib.sqfs_id_table_read(tbl, ctx.file, ctypes.byref(sb), ctx.cmp), f"{self.path}: id table")
            out = ctypes.c_uint32()
            ids = []
            for i in range(sb.id_count):
                check(lib.sqfs_id_table_index_to_id(tbl, i, ctypes.byref(out)), f"{self.path}: id table")
                ids.append(out.value)
            return ids
        finally:
            L.destroy(tbl)

    def _ctx(self) -> _Context:
        ctx: _Context | None = getattr(self._tls, "ctx", None)
        if ctx is None:
            if self._closed:
                raise SquashfsError(f"{self.path}: image is closed")
            ctx = _Context(self)
            with self._ctx_lock:
                self._contexts.append(ctx)
            self._tls.ctx = ctx
        return ctx

    def close(self) -> None:
        """Release everything. Callers make sure no other thread still reads."""
        if self._closed:
            return
        self._closed = True
        with self._ctx_lock:
            for ctx in self._contexts:
                ctx.close()
            self._contexts.clear()
        if self._frag_table:
            L.destroy(self._frag_table)
            self._frag_table = None
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- metadata blocks
    def _meta_block(self, pos: int, start: int, limit: int) -> tuple[bytes, int] | None:
        """(uncompressed bytes, position of the next block) of the metadata block at *pos* of the
        table [start, limit), or None where libsquashfs's metadata reader would fail to load it.

        The checks are the reader's own: the block starts inside the table, its stored size is
        at most 8 KiB, it ends inside the table, it decompresses to at least one byte.
        """
        if pos < start or pos >= limit:
            return None
        hit = self._meta.get(pos)
        if hit is not None:
            return hit
        raw = os.pread(self._fd, min(2 + META, limit - pos), pos)
        if len(raw) < 2:
            return None
        head = raw[0] | raw[1] << 8
        size = head & 0x7FFF
        if size > META or pos + 2 + size > limit or len(raw) < 2 + size:
            return None
        if head & 0x8000:  # stored uncompressed
            data: bytes | None = raw[2 : 2 + size]
        else:
            data = self._ctx().decompress_meta(raw[2 : 2 + size])
        if not data:
            return None
        hit = (data, pos + 2 + size)
        with self._meta_lock:
            cache = self._meta
            cache[pos] = hit
            while len(cache) > self._meta_limit:
                del cache[next(iter(cache))]
        return hit

    def _meta_span(self, pos: int, off: int, n: int, start: int, limit: int) -> bytes:
        """Up to *n* bytes of the metadata stream from block *pos*, offset *off*, following the
        chain of blocks as libsquashfs's reader does; short where the chain breaks (callers
        that need the missing bytes leave the decoding to libsquashfs)."""
        blk = self._meta_block(pos, start, limit)
        if blk is None or off >= len(blk[0]):
            return b""
        data, nxt = blk
        if off + n <= len(data):
            return data[off : off + n]
        # No more than the rest of the table can hold (8 KiB per block of >= 3 bytes).
        n = min(n, ((limit - pos) // 3 + 1) * META)
        parts = [data[off:]]
        got = len(parts[0])
        while got < n:
            blk = self._meta_block(nxt, start, limit)
            if blk is None:
                break
            data, nxt = blk
            piece = data[: n - got]
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    # ------------------------------------------------------------------ inodes
    def inode_by_ref(self, ref: int) -> Inode:
        """Decode the inode at reference *ref* ((metadata block << 16) | offset)."""
        node = self._inodes.get(ref)  # a miss costs no lock
        if node is not None:
            with self._meta_lock:
                if ref in self._inodes:
                    self._inodes.move_to_end(ref)
            return node
        node = self._parse_inode(ref) or self._decode_inode(ref)
        with self._meta_lock:
            self._inodes.store(ref, node)
        return node

    def _parse_inode(self, ref: int) -> Inode | None:
        """Decode the inode at *ref* from the metadata blocks; None when the image is damaged
        there (anything libsquashfs or :meth:`_convert` would refuse): the caller then lets
        libsquashfs decode it, which raises the error."""
        start, limit, block_size = self._inode_table
        pos, off = start + (ref >> 16), ref & 0xFFFF
        blk = self._meta.get(pos) if pos < limit else None
        if blk is None:
            blk = self._meta_block(pos, start, limit)
            if blk is None:
                return None
        buf = blk[0]
        p = off
        if off + 56 > len(buf):  # 56: the longest fixed part (header + extended file)
            if off >= len(buf):
                return None
            buf, p = self._meta_span(pos, off, 56, start, limit), 0
            if len(buf) < 16:
                return None
        t, mode, uid_idx, gid_idx, mtime, ino = _BASE.unpack_from(buf, p)
        fixed = _INODE_FIXED.get(t)
        if fixed is None:
            return None
        ids = self._ids
        if uid_idx >= len(ids) or gid_idx >= len(ids):
            return None
        need = 16 + fixed
        if len(buf) - p < need:
            return None
        basic = t - 7 if t > 7 else t
        q = p + 16
        n = self._inode_head(ref, t, basic, mode, uid_idx, gid_idx, mtime, ino)
        n._block_offsets = None
        n.frag_loc = None
        n.rdev = 0
        if basic == 2:
            if t == 2:
                n.blocks_start, frag, foff, size = _FILE.unpack_from(buf, q)
                n.nlink = 1
                n.xattr_idx = XATTR_NONE
            else:
                n.blocks_start, size, _sparse, n.nlink, frag, foff, n.xattr_idx = _FILE_EXT.unpack_from(buf, q)
            full, tail = divmod(size, block_size)
            if tail:
                # libsquashfs counts the short last block when either fragment field says
                # "none"; _convert refuses the image unless the index does.
                if frag == NO_FRAGMENT:
                    full += 1
                elif foff == 0xFFFFFFFF:
                    return None
            if full:
                q += fixed
                if len(buf) - q < full * 4:
                    buf, q = self._meta_span(pos, off, need + full * 4, start, limit), need
                    if len(buf) < need + full * 4:
                        return None
                n.block_words = array("I", buf[q : q + full * 4])
            else:
                n.block_words = array("I")
            n.size = size
            n.frag_index = frag
            n.frag_offset = foff
            n.dir_block = n.dir_offset = n.dir_size = 0
            n.target = b""
            return n
        n.blocks_start = 0
        n.block_words = None
        n.frag_index = NO_FRAGMENT
        n.frag_offset = 0
        if basic == 1:
            if t == 1:
                n.dir_block, n.nlink, size, n.dir_offset, _parent = _DIR.unpack_from(buf, q)
                n.xattr_idx = XATTR_NONE
            else:
                n.nlink, size, n.dir_block, _parent, icount, n.dir_offset, n.xattr_idx = _DIR_EXT.unpack_from(buf, q)
                if size and icount and not self._index_readable(buf, p, pos, off, icount):
                    return None
            n.size = n.dir_size = size
            n.target = b""
            return n
        n.dir_block = n.dir_offset = n.dir_size = 0
        n.target = b""
        n.size = 0
        n.xattr_idx = XATTR_NONE
        if basic == 3:
            n.nlink, size = _U32X2.unpack_from(buf, q)
            total = need + size + (4 if t == 10 else 0)
            if len(buf) - p < total:
                buf, p = self._meta_span(pos, off, total, start, limit), 0
                if len(buf) < total:
                    return None
            q = p + need
            n.size = size
            n.target = buf[q : q + size]
            if t == 10:
                (n.xattr_idx,) = _U32.unpack_from(buf, q + size)
        elif basic in (4, 5):
            if t > 7:
                n.nlink, n.rdev, n.xattr_idx = _U32X3.unpack_from(buf, q)
            else:
                n.nlink, n.rdev = _U32X2.unpack_from(buf, q)
        elif t > 7:
            n.nlink, n.xattr_idx = _U32X2.unpack_from(buf, q)
        else:
            (n.nlink,) = _U32.unpack_from(buf, q)
        return n

    def _index_readable(self, buf: bytes, p: int, pos: int, off: int, icount: int) -> bool:
        """Whether the directory index after an extended directory inode (at *p* of *buf*, or
        block *pos*, offset *off*) is all in the stream: libsquashfs reads it whole and fails
        if it is not. We do not use it."""
        start, limit = self._super.inode_table_start, self._super.directory_table_start
        q = 40  # the first index entry, after the header and the fixed part
        want = q + icount * 13  # each entry takes at least 13 bytes
        for _ in range(icount):
            if len(buf) - p < q + 12:
                want = max(want, 2 * (q + 12))
                buf, p = self._meta_span(pos, off, want, start, limit), 0
                if len(buf) < q + 12:
                    return False
            q += 13 + _DIR_INDEX.unpack_from(buf, p + q)[2]
        return len(buf) - p >= q or len(self._meta_span(pos, off, q, start, limit)) >= q

    def _decode_inode(self, ref: int) -> Inode:
        """Decode the inode at *ref* with libsquashfs's inode reader (damaged metadata)."""
        ctx = self._ctx()
        out = ctypes.c_void_p()
        ret = self._read_inode(ctx.inode_reader, self._super_ptr, ref >> 16, ref & 0xFFFF, ctypes.byref(out))
        if ret < 0:
            ctx.reset_meta()
            # A reader left in a bad state by an earlier error can misreport; retry once clean.
            ret = self._read_inode(ctx.inode_reader, self._super_ptr, ref >> 16, ref & 0xFFFF, ctypes.byref(out))
            if ret < 0:
                ctx.reset_meta()
                raise L.error_for(-5 if ret == -6 else ret, f"{self.path}: inode {ref:#x}")
        addr = out.value
        if not addr:
            raise CorruptImageError(f"{self.path}: inode {ref:#x} could not be read")
        try:
            return self._convert(addr, ref)
        finally:
            self._free(addr)

    def _inode_head(
        self, ref: int, t: int, basic: int, mode: int, uid_idx: int, gid_idx: int, mtime: int, ino: int
    ) -> Inode:
        """An Inode with the fields of the common inode header set (ids already bounds-checked)."""
        n = Inode()
        n.ino = ino
        n.ref = ref
        n.itype = t
        n.mode = MODE_OF_TYPE[basic] | (mode & 0o7777)
        n.uid = self._ids[uid_idx]
        n.gid = self._ids[gid_idx]
        n.mtime = mtime
        return n

    def _convert(self, addr: int, ref: int) -> Inode:
        """Decode a sqfs_inode_generic_t at *addr* (layout of libsquashfs 1.x, see _lib)."""
        head = ctypes.string_at(addr, L.INODE_EXTRA_OFFSET)
        t, mode, uid_idx, gid_idx, mtime, ino, _avail, used = _INODE_HEAD.unpack_from(head)
        basic = t - 7 if t > 7 else t
        if basic not in MODE_OF_TYPE:
            raise CorruptImageError(f"{self.path}: inode {ref:#x} has unknown type {t}")
        ids = self._ids
        if uid_idx >= len(ids) or gid_idx >= len(ids):
            raise CorruptImageError(f"{self.path}: inode {ref:#x} has an id index beyond the id table")
        n = self._inode_head(ref, t, basic, mode, uid_idx, gid_idx, mtime, ino)
        n.size = 0
        n.nlink = 1
        n.rdev = 0
        n.blocks_start = 0
        n.block_words = None
        n._block_offsets = None
        n.frag_index = NO_FRAGMENT
        n.frag_offset = 0
        n.frag_loc = None
        n.dir_block = n.dir_offset = n.dir_size = 0
        n.target = b""
        n.xattr_idx = L.XATTR_NONE
        if basic == 2:
            if t == 2:
                n.blocks_start, n.frag_index, n.frag_offset, n.size = _FILE.unpack_from(head, 24)
            else:
                n.blocks_start, n.size, _sparse, n.nlink, n.frag_index, n.frag_offset, n.xattr_idx = _FILE_EXT.unpack_from(head, 24)
            count = used // 4
            words = array("I")
            if count:
                words.frombytes(ctypes.string_at(addr + L.INODE_EXTRA_OFFSET, count * 4))
            n.block_words = words
            bs = self._super.block_size
            full, tail = divmod(n.size, bs)
            if count != full + (1 if tail and n.frag_index == NO_FRAGMENT else 0):
                raise CorruptImageError(f"{self.path}: inode {n.ino}: block list does not match file size")
        elif basic == 1:
            if t == 1:
                n.dir_block, n.nlink, n.dir_size, n.dir_offset, _parent = _DIR.unpack_from(head, 24)
            else:
                n.nlink, n.dir_size, n.dir_block, _parent, _icount, n.dir_offset, n.xattr_idx = _DIR_EXT.unpack_from(head, 24)
            n.size = n.dir_size
        elif basic == 3:
            if t == 3:
                n.nlink, n.size = _U32X2.unpack_from(head, 24)
            else:
                n.nlink, n.size, n.xattr_idx = _U32X3.unpack_from(head, 24)
            if n.size > used:
                raise CorruptImageError(f"{self.path}: inode {n.ino}: symlink target truncated")
            n.target = ctypes.string_at(addr + L.INODE_EXTRA_OFFSET, n.size)
        elif basic in (4, 5):
            if t > 7:
                n.nlink, n.rdev, n.xattr_idx = _U32X3.unpack_from(head, 24)
            else:
                n.nlink, n.rdev = _U32X2.unpack_from(head, 24)
        elif t > 7:
            n.nlink, n.xattr_idx = _U32X2.unpack_from(head, 24)
        else:
            (n.nlink,) = _U32.unpack_from(head, 24)
        return n

    # ------------------------------------------------------------- directories
    def listing(self, dir_inode: Inode) -> DirListing:
        """The entries of a directory (cached; bounded by total entries)."""
        if not dir_inode.is_dir:
            raise SquashfsError(f"inode {dir_inode.ino} is not a directory", -12)
        with self._meta_lock:
            lst = self._dirs.lookup(dir_inode.ref)
        if lst is not None:
            return lst
        lst = self._parse_dir(dir_inode)
        if lst is None:
            lst = self._read_dir(dir_inode)
        with self._meta_lock:
            if dir_inode.ref not in self._dirs:
                self._dirs.store(dir_inode.ref, lst)
                self._dir_entries += len(lst)
                while self._dir_entries > self._dir_entry_limit and len(self._dirs) > 1:
                    _, old = self._dirs.popitem(last=False)
                    self._dir_entries -= len(old)
        return lst

    def _parse_dir(self, dir_inode: Inode) -> DirListing | None:
        """A directory's entries decoded from the metadata blocks; None when its metadata is
        damaged (anything libsquashfs's readdir or :meth:`_read_dir` would refuse): the caller
        then reads it through libsquashfs, which reports the error and the entries before it.

        The listing is the directory's stored size minus 3 bytes of headers (count - 1, start
        block, base inode number: 12 bytes) each followed by up to 256 entries (offset, inode
        number delta, type, name size - 1: 8 bytes, then the name). Like libsquashfs, stop
        when fewer than 10 bytes are left where a header would start and fewer than 6 where an
        entry would; anything read past the listing's size means damage.
        """
        size = dir_inode.dir_size
        if size <= 12:  # no room for a header: libsquashfs reads nothing and finds no entry
            return DirListing([], [], [], [])
        sb = self._super
        start = sb.directory_table_start
        end = size - 3
        buf = self._meta_span(start + dir_inode.dir_block, dir_inode.dir_offset, end, start, self._dir_table_end)
        if len(buf) < end:
            return None
        names: list[bytes] = []
        refs: list[int] = []
        inos: list[int] = []
        types: list[int] = []
        add_name, add_ref, add_ino, add_type = names.append, refs.append, inos.append, types.append
        header = _U32X3.unpack_from
        entry = _DIR_ENTRY.unpack_from
        p = 0
        while end - p > 9:
            if p + 12 > end:
                return None
            count, block, base = header(buf, p)
            if count > 255:
                return None
            p += 12
            block <<= 16
            for _ in range(count + 1):
                if end - p <= 5:
                    break
                if p + 8 > end:
                    return None
                offset, delta, etype, nlen = entry(buf, p)
                q = p + 9 + nlen
                if q > end:
                    return None
                add_name(buf[p + 8 : q])
                add_ref(block | offset)
                add_ino((base + delta) & 0xFFFFFFFF)
                add_type(etype)
                p = q
            if len(names) > sb.inode_count:
                return None
        # Names are checked all at once: '/' only as the separator, no NUL, no '.' or '..'.
        joined = b"/".join(names)
        if names and (b"\0" in joined or joined.count(b"/") != len(names) - 1):
            return None
        lst = DirListing(names, refs, inos, types)
        if b"." in lst.index or b".." in lst.index:
            return None
        return lst

    def _read_dir(self, dir_inode: Inode) -> DirListing:
        """A directory's entries through libsquashfs's readdir (damaged metadata)."""
        ctx = self._ctx()
        state = L.sqfs_readdir_state_t()
        state.init.block = self._super.directory_table_start + dir_inode.dir_block
        state.init.offset = dir_inode.dir_offset
        state.init.size = dir_inode.dir_size
        state.current.block = state.init.block
        state.current.offset = state.init.offset
        state.current.size = state.init.size
        ent = ctypes.c_void_p()
        inum = ctypes.c_uint32()
        iref = ctypes.c_uint64()
        names: list[bytes] = []
        refs: list[int] = []
        inos: list[int] = []
        types: list[int] = []
        readdir = self._readdir
        free = self._free
        string_at = ctypes.string_at
        args = (ctx.dir_reader, ctypes.byref(state), ctypes.byref(ent), ctypes.byref(inum), ctypes.byref(iref))
        limit = self._super.inode_count
        what = f"{self.path}: directory of inode {dir_inode.ino}"
        hdr = L.DIR_ENTRY_NAME_OFFSET
        try:
            while True:
                ret = readdir(*args)
                if ret > 0:
                    break
                check(ret, what)
                addr = ent.value
                if not addr:
                    raise CorruptImageError(f"{what}: unreadable entry")
                try:
                    _off, _diff, etype, size = _DIR_ENTRY.unpack_from(string_at(addr, hdr))
                    name = string_at(addr + hdr, size + 1)
                finally:
                    free(addr)
                if b"/" in name or b"\0" in name or name in (b".", b".."):
                    raise CorruptImageError(f"{what}: invalid entry name {name!r}")
                names.append(name)
                refs.append(iref.value)
                inos.append(inum.value)
                types.append(etype)
                if len(names) > limit:
                    raise CorruptImageError(f"{what}: more entries than inodes in the image")
        except SquashfsError as e:
            ctx.reset_meta()
            if not names:
                raise
            return DirListing(names, refs, inos, types, error=e)
        return DirListing(names, refs, inos, types)

    def lookup(self, dir_inode: Inode, name: bytes) -> Inode | None:
        lst = self.listing(dir_inode)
        i = lst.index.get(name)
        if i is None:
            if lst.error is not None:
                raise lst.error  # the name may be in the damaged part
            return None
        return self.inode_by_ref(lst.refs[i])

    def listdir(self, dir_inode: Inode) -> list[tuple[bytes, Inode]]:
        lst = self.listing(dir_inode)
        if lst.error is not None:
            raise lst.error
        return [(n, self.inode_by_ref(r)) for n, r in zip(lst.names, lst.refs, strict=True)]

    def walk(self, top: Inode | None = None) -> Iterator[tuple[bytes, Inode]]:
        """Every entry, depth-first, paths relative to the root (b"" is the root)."""
        start = top or self.root
        yield b"", start
        stack: list[tuple[bytes, Inode]] = [(b"", start)]
        seen_dirs = {start.ref}
        while stack:
            prefix, d = stack.pop()
            for name, node in self.listdir(d):
                path = prefix + b"/" + name if prefix else name
                yield path, node
                if node.is_dir:
                    if node.ref in seen_dirs:
                        raise CorruptImageError(f"{self.path}: directory loop at {path!r}")
                    seen_dirs.add(node.ref)
                    stack.append((path, node))

    def resolve(self, path: bytes | str) -> Inode:
        """Resolve a path inside the image (no symlink following); ENOENT as SquashfsError."""
        p = os.fsencode(path)
        node = self.root
        for part in p.split(b"/"):
            if part in (b"", b"."):
                continue
            nxt = self.lookup(node, part) if node.is_dir else None
            if nxt is None:
                raise SquashfsError(f"{os.fsdecode(p)}: no such path in {self.path}", -13)
            node = nxt
        return node

    # --------------------------------------------------------------- file data
    def readlink(self, inode: Inode) -> bytes:
        if not inode.is_symlink:
            raise SquashfsError(f"inode {inode.ino} is not a symlink", -16)
        return inode.target

    def block_count(self, inode: Inode) -> int:
        return len(inode.block_words or ())

    def _load_block(self, off: int, word: int, expect: int) -> bytes:
        n = word & L.SQFS_BLOCK_SIZE_MASK
        bs = self._super.block_size
        if n > bs or off + n > self._super.bytes_used:
            raise CorruptImageError(f"{self.path}: data block at {off} has impossible size {n}")
        if not word & L.SQFS_BLOCK_UNCOMPRESSED and (ctx := self._ctx()).native is not None:
            data = ctx.load(self._fd, off, n)
        else:
            raw = self.read_raw(off, n)
            data = raw if word & L.SQFS_BLOCK_UNCOMPRESSED else self._ctx().decompress(raw, bs)
        if expect >= 0 and len(data) != expect:
            raise CorruptImageError(f"{self.path}: data block at {off} decodes to {len(data)} bytes, expected {expect}")
        return data

    def block(self, inode: Inode, index: int) -> bytes:
        """Decompressed data block *index* of a file (through the shared cache)."""
        piece = self._block(inode, index, True)
        assert piece is not None
        return piece

    def _block_len(self, inode: Inode, index: int) -> int:
        """Bytes of data block *index* once decoded: a full block, except the last one of a
        file without a fragment tail."""
        bs = self._super.block_size
        if index + 1 < len(inode.block_words or ()) or inode.frag_index != NO_FRAGMENT:
            return bs
        return inode.size - index * bs

    def _block(self, inode: Inode, index: int, load: bool) -> bytes | None:
        words = inode.block_words
        assert words is not None
        word = words[index]
        if word & L.SQFS_BLOCK_SIZE_MASK == 0:  # sparse block
            return bytes(self._block_len(inode, index))
        off = inode.block_offsets[index]
        key = (self._key, off)
        if not load:
            return self.cache.get(key)
        expect = self._block_len(inode, index)
        return self.cache.get_or_load(key, lambda: self._load_block(off, word, expect))

    def _fragment(self, inode: Inode) -> tuple[int, int]:
        """(on-disk start, size word) of the file's fragment block, memoized on the inode."""
        loc = inode.frag_loc
        if loc is None:
            if self._frag_table is None:
                raise CorruptImageError(f"{self.path}: inode {inode.ino} uses a fragment but the image has none")
            fr = L.sqfs_fragment_t()
            check(self._frag_lookup(self._frag_table, inode.frag_index, ctypes.byref(fr)),
                  f"{self.path}: fragment {inode.frag_index}")  # fmt: skip
            loc = inode.frag_loc = (fr.start_offset, fr.size)
        return loc

    def _tail(self, inode: Inode, load: bool) -> memoryview | bytes | None:
        """The tail end of a file stored in a fragment block (a view, no copy)."""
        tail = inode.size - len(inode.block_words or ()) * self._super.block_size
        if tail <= 0 or inode.frag_index == NO_FRAGMENT:
            return b""
        start, word = self._fragment(inode)
        key = (self._key, start)
        if load:
            data: bytes | None = self.cache.get_or_load(key, lambda: self._load_block(start, word, -1))
        else:
            data = self.cache.get(key)
            if data is None:
                return None
        assert data is not None
        o = inode.frag_offset
        if o + tail > len(data):
            raise CorruptImageError(f"{self.path}: inode {inode.ino}: fragment tail beyond its fragment block")
        return memoryview(data)[o : o + tail]

    def read_view(self, inode: Inode, offset: int, size: int, load: bool = True) -> memoryview | bytes | None:
        """Up to *size* bytes from *offset* as a bytes-like object, without copying when possible.

        With ``load=False`` nothing is decoded: None when a needed block is not cached.
        """
        if not inode.is_file:
            raise SquashfsError(f"inode {inode.ino} is not a regular file", -15)
        end = min(inode.size, offset + size)
        if offset >= end:
            return b""
        bs = self._super.block_size
        nblocks = len(inode.block_words or ())
        first, last = offset // bs, (end - 1) // bs
        parts: list[memoryview | bytes] = []
        for i in range(first, last + 1):
            piece = self._block(inode, i, load) if i < nblocks else self._tail(inode, load)
            if piece is None:
                return None
            base = i * bs
            lo = max(offset, base) - base
            hi = min(end, base + bs) - base
            parts.append(piece[lo:hi] if isinstance(piece, memoryview) else memoryview(piece)[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drop_served(self, inode: Inode, offset: int, end: int) -> None:
        """Forget the cached data blocks that lie wholly within bytes [*offset*, *end*) of a
        file, once a read of that range has been served (drop-behind).

        The kernel keeps what it was given in its page cache and asks again only after
        evicting it, and while it is being read no other request can want those pages; so
        such blocks are dead weight, and a long stream of them would otherwise fill the whole
        cache with fresh memory. Blocks the range covers only in part (which a neighbouring
        request may still need) and fragment blocks (shared by many small files) are kept.
        """
        words = inode.block_words
        if not words:
            return
        bs = self._super.block_size
        first = -(-offset // bs)
        stop = min(end // bs, len(words))
        if end >= inode.size and inode.frag_index == NO_FRAGMENT:
            stop = len(words)  # the file's short last block ends with it
        offs = inode.block_offsets
        for i in range(first, stop):
            if words[i] & L.SQFS_BLOCK_SIZE_MASK:  # a sparse block has no key of its own
                self.cache.discard((self._key, offs[i]))

    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Up to *size* bytes of a regular file from *offset* (short at EOF)."""
        data = self.read_view(inode, offset, size, True)
        assert data is not None
        return bytes(data)

    def fragment_tail(self, inode: Inode) -> bytes:
        view = self._tail(inode, True)
        assert view is not None
        return bytes(view)

    def raw_span(self, inode: Inode, offset: int, size: int) -> tuple[int, int] | None:
        """(image offset, length) when this range of the file is stored as is, in one piece.

        That is when every block it touches is stored uncompressed (incompressible data),
        full-sized and right after the previous one, and the range does not reach a fragment
        tail: the bytes can then be read straight from the image with one pread, no decoding
        and no block cache (the page cache of the image keeps them). None otherwise.
        """
        end = min(inode.size, offset + size)
        words = inode.block_words
        if offset >= end or not words:
            return None
        bs = self._super.block_size
        first, last = offset // bs, (end - 1) // bs
        nblocks = len(words)
        if last >= nblocks:
            return None
        offs = inode.block_offsets
        for i in range(first, last + 1):
            w = words[i]
            if not w & L.SQFS_BLOCK_UNCOMPRESSED or w & L.SQFS_BLOCK_SIZE_MASK != self._block_len(inode, i):
                return None
            if i > first and offs[i] != offs[i - 1] + bs:
                return None
        pos = offs[first] + (offset - first * bs)
        if pos + (end - offset) > self._super.bytes_used:
            raise CorruptImageError(f"{self.path}: inode {inode.ino}: data beyond the end of the image")
        return pos, end - offset

    def read_raw(self, pos: int, length: int) -> bytes:
        """*length* bytes from image offset *pos* (a span from :meth:`raw_span`, or a stored
        block), in a new bytes object (allocated without being zeroed first, unlike a bytearray)."""
        data = os.pread(self._fd, length, pos)
        if len(data) != length:
            raise ImageIOError(f"{self.path}: short read at {pos} (image truncated?)")
        return data

    def read_raw_into(self, buf: memoryview, pos: int, cached_only: bool = False) -> bool:
        """Fill *buf* from image offset *pos* (a span from :meth:`raw_span`).

        With *cached_only*, only from the page cache: False (and *buf* in an undefined
        state) when that would wait for the disk, so that the caller can read elsewhere.
        """
        if cached_only:
            try:
                return os.preadv(self._fd, [buf], pos, os.RWF_NOWAIT) == len(buf)
            except OSError:  # EAGAIN: not cached (EOPNOTSUPP: no such flag here; errors: see below)
                return False
        n = os.preadv(self._fd, [buf], pos)
        if n != len(buf):
            raise ImageIOError(f"{self.path}: short read at {pos} (image truncated?)")
        return True

    def loads(
        self, inode: Inode, offset: int, size: int, skip_raw: bool = False
    ) -> list[tuple[tuple[int, int], Callable[[], bytes]]]:
        """(cache key, loader) of every stored block a read of this range needs, in order.

        Sparse blocks need no load; with *skip_raw*, neither do blocks stored uncompressed. A
        caller claims each key with ``cache.begin_load`` and runs the loaders it owns wherever
        it likes (worker threads), in any order.
        """
        end = min(inode.size, offset + size)
        if offset >= end or not inode.is_file:
            return []
        bs = self._super.block_size
        words = inode.block_words or ()
        offs = inode.block_offsets
        out: list[tuple[tuple[int, int], Callable[[], bytes]]] = []
        for i in range((offset // bs), (end - 1) // bs + 1):
            if i < len(words):
                word = words[i]
                if not word & L.SQFS_BLOCK_SIZE_MASK or (skip_raw and word & L.SQFS_BLOCK_UNCOMPRESSED):
                    continue
                expect = self._block_len(inode, i)
                out.append(((self._key, offs[i]), functools.partial(self._load_block, offs[i], word, expect)))
            elif inode.frag_index != NO_FRAGMENT:
                start, fword = self._fragment(inode)
                out.append(((self._key, start), functools.partial(self._load_block, start, fword, -1)))
        return out

    def fragment_load(self, index: int) -> tuple[tuple[int, int], Callable[[], bytes]] | None:
        """(cache key, loader) of fragment block *index*, or None if there is no such block."""
        if self._frag_table is None or index >= self._super.fragment_entry_count:
            return None
        fr = L.sqfs_fragment_t()
        if self._frag_lookup(self._frag_table, index, ctypes.byref(fr)) < 0:
            return None
        start, word = fr.start_offset, fr.size
        return (self._key, start), functools.partial(self._load_block, start, word, -1)

    # ------------------------------------------------------------------ xattrs
    def xattrs(self, inode: Inode) -> dict[bytes, bytes]:
        if inode.xattr_idx == L.XATTR_NONE or not self.info.has_xattrs:
            return {}
        xr = self._ctx().xattrs()
        desc = L.sqfs_xattr_id_t()
        what = f"{self.path}: xattrs of inode {inode.ino}"
        check(lib.sqfs_xattr_reader_get_desc(xr, inode.xattr_idx, ctypes.byref(desc)), what)
        check(lib.sqfs_xattr_reader_seek_kv(xr, ctypes.byref(desc)), what)
        out: dict[bytes, bytes] = {}
        key = ctypes.POINTER(L.sqfs_xattr_entry_t)()
        val = ctypes.POINTER(L.sqfs_xattr_value_t)()
        if desc.count > 65536:
            raise CorruptImageError(f"{what}: absurd count {desc.count}")
        for _ in range(desc.count):
            check(lib.sqfs_xattr_reader_read_key(xr, ctypes.byref(key)), what)
            try:
                check(lib.sqfs_xattr_reader_read_value(xr, key, ctypes.byref(val)), what)
                try:
                    k = key.contents
                    # The decoded key carries its prefix ("user.") and a terminating NUL.
                    name = ctypes.string_at(ctypes.addressof(k) + L.XATTR_KEY_OFFSET)
                    v = val.contents
                    value = ctypes.string_at(ctypes.addressof(v) + L.XATTR_VALUE_OFFSET, v.size)
                finally:
                    L.free(val)
                prefix = lib.sqfs_get_xattr_prefix(k.type & 0xFF) or b""
                out[name if name.startswith(prefix) else prefix + name] = value
            finally:
                L.free(key)
        return out

    def statfs_counts(self) -> tuple[int, int]:
        """(bytes used by the image, inode count) for statfs."""
        return self._super.bytes_used, self._super.inode_count


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)

