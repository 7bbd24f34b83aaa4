"""Squashfs directories: a :class:`DirListing`, and the two ways of reading one.

:func:`parse_dir` decodes a listing from the uncompressed metadata blocks of the directory
table, accepting only what libsquashfs's readdir would read successfully; on anything else
(damage) it returns None and :func:`read_dir` reads it through libsquashfs, which reports the
error and the entries before it.
"""

from __future__ import annotations

import ctypes
import struct

from . import _lib as L
from ._lib import check, lib
from .context import ThreadContext
from .errors import CorruptImageError, SquashfsError
from .inode import Inode
from .metadata import MetaBlocks

_HEADER = struct.Struct("<III")  # entry count - 1, start block of their inodes, base inode number
_DIR_ENTRY = struct.Struct("<HhHH")  # inode offset, inode number delta, type, name size - 1


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


def parse_dir(meta: MetaBlocks, dir_inode: Inode, start: int, limit: int, inode_count: int) -> DirListing | None:
    """A directory's entries decoded from the metadata blocks of the directory table [*start*,
    *limit*) of an image of *inode_count* inodes; None when its metadata is damaged (anything
    libsquashfs's readdir or :func:`read_dir` would refuse): the caller then reads it through
    libsquashfs, which reports the error and the entries before it.

    The listing is the directory's stored size minus 3 bytes of headers (count - 1, start
    block, base inode number: 12 bytes) each followed by up to 256 entries (offset, inode
    number delta, type, name size - 1: 8 bytes, then the name). Like libsquashfs, stop
    when fewer than 10 bytes are left where a header would start and fewer than 6 where an
    entry would; anything read past the listing's size means damage.
    """
    size = dir_inode.dir_size
    if size <= 12:  # no room for a header: libsquashfs reads nothing and finds no entry
        return DirListing([], [], [], [])
    end = size - 3
    buf = meta.span(start + dir_inode.dir_block, dir_inode.dir_offset, end, start, limit)
    if len(buf) < end:
        return None
    names: list[bytes] = []
    refs: list[int] = []
    inos: list[int] = []
    types: list[int] = []
    add_name, add_ref, add_ino, add_type = names.append, refs.append, inos.append, types.append
    header = _HEADER.unpack_from
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
        if len(names) > inode_count:
            return None
    # Names are checked all at once: '/' only as the separator, no NUL, no '.' or '..'.
    joined = b"/".join(names)
    if names and (b"\0" in joined or joined.count(b"/") != len(names) - 1):
        return None
    lst = DirListing(names, refs, inos, types)
    if b"." in lst.index or b".." in lst.index:
        return None
    return lst


def read_dir(ctx: ThreadContext, dir_inode: Inode, start: int, inode_count: int, what: str) -> DirListing:
    """A directory's entries through libsquashfs's readdir (damaged metadata), with *ctx*'s
    directory reader over the table at *start*; *what* names the directory in errors."""
    state = L.sqfs_readdir_state_t()
    state.init.block = start + dir_inode.dir_block
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
    readdir = lib.sqfs_meta_reader_readdir
    free = lib.sqfs_free
    string_at = ctypes.string_at
    args = (ctx.dir_reader, ctypes.byref(state), ctypes.byref(ent), ctypes.byref(inum), ctypes.byref(iref))
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
            if len(names) > inode_count:
                raise CorruptImageError(f"{what}: more entries than inodes in the image")
    except SquashfsError as e:
        ctx.reset_meta()
        if not names:
            raise
        return DirListing(names, refs, inos, types, error=e)
    return DirListing(names, refs, inos, types)
