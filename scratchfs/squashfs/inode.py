"""Squashfs inodes: the decoded :class:`Inode`, and the two ways of decoding one.

:func:`parse_inode` decodes an inode from the uncompressed metadata blocks of the inode table
(:class:`.metadata.MetaBlocks`): a ctypes call costs more than parsing an entry. It accepts only
what libsquashfs's inode reader would read successfully, checking the same bounds, and returns
None on anything else (damage); :func:`from_generic` then converts what libsquashfs's own reader
makes of it, so that errors come from one place.
"""

from __future__ import annotations

import ctypes
import stat
import struct
from array import array
from collections.abc import Sequence
from itertools import accumulate

from . import _lib as L
from .errors import CorruptImageError
from .metadata import MetaBlocks

MODE_OF_TYPE = {
    1: stat.S_IFDIR,
    2: stat.S_IFREG,
    3: stat.S_IFLNK,
    4: stat.S_IFBLK,
    5: stat.S_IFCHR,
    6: stat.S_IFIFO,
    7: stat.S_IFSOCK,
}

NO_FRAGMENT = 0xFFFFFFFF
XATTR_NONE = L.XATTR_NONE

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
_BASE = struct.Struct("<HHHHII")  # on-disk inode header: type, mode, uid idx, gid idx, mtime, number
_DIR_INDEX = struct.Struct("<III")  # start block, index, name size - 1 (then the name)
# On-disk bytes after the 16-byte header of each inode type, before any variable part.
_INODE_FIXED = {1: 16, 2: 16, 3: 8, 4: 8, 5: 8, 6: 4, 7: 4, 8: 24, 9: 40, 10: 8, 11: 12, 12: 12, 13: 8, 14: 8}


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


def _new_inode(ref: int, t: int, basic: int, mode: int, uid: int, gid: int, mtime: int, ino: int) -> Inode:
    """An Inode with the fields of the common inode header set."""
    n = Inode()
    n.ino = ino
    n.ref = ref
    n.itype = t
    n.mode = MODE_OF_TYPE[basic] | (mode & 0o7777)
    n.uid = uid
    n.gid = gid
    n.mtime = mtime
    return n


def parse_inode(meta: MetaBlocks, ref: int, table: tuple[int, int, int], ids: Sequence[int]) -> Inode | None:
    """Decode the inode at *ref* from the metadata blocks of the inode table (``table``: its
    start, its end (the directory table's start) and the image's block size; ``ids``: the id
    table); None when the image is damaged there (anything libsquashfs or :func:`from_generic`
    would refuse): the caller then lets libsquashfs decode it, which raises the error."""
    start, limit, block_size = table
    pos, off = start + (ref >> 16), ref & 0xFFFF
    blk = meta.cached.get(pos) if pos < limit else None
    if blk is None:
        blk = meta.block(pos, start, limit)
        if blk is None:
            return None
    buf = blk[0]
    p = off
    if off + 56 > len(buf):  # 56: the longest fixed part (header + extended file)
        if off >= len(buf):
            return None
        buf, p = meta.span(pos, off, 56, start, limit), 0
        if len(buf) < 16:
            return None
    t, mode, uid_idx, gid_idx, mtime, ino = _BASE.unpack_from(buf, p)
    fixed = _INODE_FIXED.get(t)
    if fixed is None:
        return None
    if uid_idx >= len(ids) or gid_idx >= len(ids):
        return None
    need = 16 + fixed
    if len(buf) - p < need:
        return None
    basic = t - 7 if t > 7 else t
    q = p + 16
    n = _new_inode(ref, t, basic, mode, ids[uid_idx], ids[gid_idx], mtime, ino)
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
            # "none"; from_generic refuses the image unless the index does.
            if frag == NO_FRAGMENT:
                full += 1
            elif foff == 0xFFFFFFFF:
                return None
        if full:
            q += fixed
            if len(buf) - q < full * 4:
                buf, q = meta.span(pos, off, need + full * 4, start, limit), need
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
            if size and icount and not _index_readable(meta, buf, p, pos, off, icount, start, limit):
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
            buf, p = meta.span(pos, off, total, start, limit), 0
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

def _index_readable(meta: MetaBlocks, buf: bytes, p: int, pos: int, off: int, icount: int, start: int, limit: int) -> bool:
    """Whether the directory index after an extended directory inode (at *p* of *buf*, or
    block *pos*, offset *off*) is all in the stream: libsquashfs reads it whole and fails
    if it is not. We do not use it."""
    q = 40  # the first index entry, after the header and the fixed part
    want = q + icount * 13  # each entry takes at least 13 bytes
    for _ in range(icount):
        if len(buf) - p < q + 12:
            want = max(want, 2 * (q + 12))
            buf, p = meta.span(pos, off, want, start, limit), 0
            if len(buf) < q + 12:
                return False
        q += 13 + _DIR_INDEX.unpack_from(buf, p + q)[2]
    return len(buf) - p >= q or len(meta.span(pos, off, q, start, limit)) >= q


def from_generic(addr: int, ref: int, ids: Sequence[int], block_size: int, path: object) -> Inode:
    """Decode the sqfs_inode_generic_t at *addr* that libsquashfs's inode reader made of the
    inode at *ref* (layout of libsquashfs 1.x, see _lib); *path* names the image in errors."""
    head = ctypes.string_at(addr, L.INODE_EXTRA_OFFSET)
    t, mode, uid_idx, gid_idx, mtime, ino, _avail, used = _INODE_HEAD.unpack_from(head)
    basic = t - 7 if t > 7 else t
    if basic not in MODE_OF_TYPE:
        raise CorruptImageError(f"{path}: inode {ref:#x} has unknown type {t}")
    if uid_idx >= len(ids) or gid_idx >= len(ids):
        raise CorruptImageError(f"{path}: inode {ref:#x} has an id index beyond the id table")
    n = _new_inode(ref, t, basic, mode, ids[uid_idx], ids[gid_idx], mtime, ino)
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
        full, tail = divmod(n.size, block_size)
        if count != full + (1 if tail and n.frag_index == NO_FRAGMENT else 0):
            raise CorruptImageError(f"{path}: inode {n.ino}: block list does not match file size")
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
            raise CorruptImageError(f"{path}: inode {n.ino}: symlink target truncated")
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

