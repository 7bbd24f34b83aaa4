"""Reading a squashfs image through libsquashfs.

Opening reads the superblock, the id table and the fragment table only. Inodes are read on
demand by reference (our inode table is keyed by inode reference, never by path); directory
listings and decoded inodes live in bounded LRU caches; data and fragment blocks are read
whole (pread + the image's decompressor, in one native call where ``_blockload.c`` is built)
into a bounded, shared :class:`BlockCache`.

Inodes (:mod:`.inode`) and directories (:mod:`.directory`) are decoded in Python from whole
metadata blocks (:mod:`.metadata`: pread + the image's decompressor, a few hundred uncompressed
blocks kept per image): a ctypes call costs more than parsing an entry, and libsquashfs's
readers take several calls per entry. That decoder accepts only what libsquashfs's readers
would read successfully, checking the same bounds; on anything else (damage) it steps aside and
libsquashfs's own readers decode the inode or directory, so errors and partial listings come
from one place.

Thread safety: libsquashfs reader objects are not thread-safe, so every thread gets its own
context (:mod:`.context`: file handle, decompressor, metadata readers, xattr reader) on first use. What is
shared is immutable after open (superblock copy, id list, fragment table, which is only looked
up) or guarded by a lock (the caches).
"""


from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import _lib as L
from ._lib import check, lib
from .cache import BlockCache
from .context import ThreadContext
from .directory import DirListing, parse_dir, read_dir
from .errors import CorruptImageError, ImageIOError, NotSquashfsError, SquashfsError
from .inode import NO_FRAGMENT, Inode, from_generic, parse_inode
from .metadata import MetaBlocks
from .superblock import ABSENT, describe, read_ids, read_super, validate

log = logging.getLogger(__name__)

_IMAGE_KEYS = itertools.count(1)


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

    def store(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


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
        self._contexts: list[ThreadContext] = []
        self._ctx_lock = threading.Lock()
        self._meta_lock = threading.Lock()  # guards the inode and directory caches
        self._frag_table: int | None = None
        self._frag_lookup = lib.sqfs_frag_table_lookup
        self._read_inode = lib.sqfs_meta_reader_read_inode
        self._free = lib.sqfs_free
        self.cache = block_cache if block_cache is not None else BlockCache(cache_size)
        self._inodes = _LRU(inode_cache)
        self._dirs = _LRU(1 << 30)
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
        self._metablocks = MetaBlocks(self._fd, self._decompress_meta, meta_cache_blocks)
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
        sb, self.file_size = read_super(self._fd, self.path)
        self._dir_table_end = validate(sb, self.file_size, self.path)
        self._super = sb
        self._super_ptr = ctypes.pointer(sb)
        # Plain ints for the inode decoder (a ctypes field read costs more than a tuple's).
        self._inode_table = (sb.inode_table_start, sb.directory_table_start, sb.block_size)
        ctx = self._ctx()
        self._ids = read_ids(ctx, sb, self.path)
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
        self.info = describe(sb)

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

    def _ctx(self) -> ThreadContext:
        ctx: ThreadContext | None = getattr(self._tls, "ctx", None)
        if ctx is None:
            if self._closed:
                raise SquashfsError(f"{self.path}: image is closed")
            ctx = ThreadContext(self.path, self._super, self._dir_table_end)
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

    def _decompress_meta(self, raw: bytes) -> bytes | None:
        return self._ctx().decompress_meta(raw)

    def _parse_inode(self, ref: int) -> Inode | None:
        """The inode at *ref* decoded from the metadata blocks; None where they are damaged."""
        return parse_inode(self._metablocks, ref, self._inode_table, self._ids)

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
            return from_generic(addr, ref, self._ids, self._super.block_size, self.path)
        finally:
            self._free(addr)

    # ------------------------------------------------------------- directories
    def _parse_dir(self, dir_inode: Inode) -> DirListing | None:
        """A directory decoded from the metadata blocks; None where they are damaged."""
        sb = self._super
        return parse_dir(self._metablocks, dir_inode, sb.directory_table_start, self._dir_table_end, sb.inode_count)

    def _read_dir(self, dir_inode: Inode) -> DirListing:
        """A directory read through libsquashfs's readdir (damaged metadata)."""
        sb = self._super
        what = f"{self.path}: directory of inode {dir_inode.ino}"
        return read_dir(self._ctx(), dir_inode, sb.directory_table_start, sb.inode_count, what)

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

