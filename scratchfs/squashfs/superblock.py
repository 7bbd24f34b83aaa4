"""A squashfs image's superblock: read, checked against the image, and described."""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import _lib as L
from ._lib import check, lib
from .context import ThreadContext
from .errors import CorruptImageError, ImageIOError, NotSquashfsError, UnsupportedImageError

ABSENT = 0xFFFFFFFFFFFFFFFF  # a table the image does not have


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


def read_super(fd: int, path: Path) -> tuple[L.sqfs_super_t, int]:
    """The superblock of the image open as *fd* (at *path*), and the image's size in bytes:
    a regular file or a block device starting with squashfs's magic."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
        raise NotSquashfsError(f"{path}: not a regular file")
    file_size = st.st_size if stat.S_ISREG(st.st_mode) else _blockdev_size(fd)
    head = os.pread(fd, 4, 0)
    if head != b"hsqs":
        raise NotSquashfsError(f"{path}: not a squashfs image (no 'hsqs' magic)")
    if file_size < ctypes.sizeof(L.sqfs_super_t):
        raise CorruptImageError(f"{path}: truncated image ({file_size} bytes)")
    sb = L.sqfs_super_t()
    f = lib.sqfs_open_file(os.fsencode(path), L.SQFS_FILE_OPEN_READ_ONLY)
    if not f:
        raise ImageIOError(f"{path}: cannot open image")
    try:
        check(lib.sqfs_super_read(ctypes.byref(sb), f), f"{path}: superblock")
    finally:
        L.destroy(f)
    return sb, file_size


def validate(sb: L.sqfs_super_t, file_size: int, path: Path) -> int:
    """Refuse a superblock whose tables cannot be where it says (one-line errors); the end of
    the directory table (the start of the next table) when they can."""
    if sb.compression_id not in L.COMPRESSORS:
        raise UnsupportedImageError(f"{path}: unknown compressor id {sb.compression_id}")
    if sb.bytes_used > file_size:
        raise CorruptImageError(
            f"{path}: truncated image: superblock says {sb.bytes_used} bytes, file has {file_size}"
        )
    if sb.inode_count == 0:
        raise CorruptImageError(f"{path}: superblock says the image has no inodes")
    if not (ctypes.sizeof(L.sqfs_super_t) <= sb.inode_table_start < sb.directory_table_start < sb.bytes_used):
        raise CorruptImageError(f"{path}: inode/directory table offsets out of order or beyond the image")
    for name in ("id_table_start", "fragment_table_start", "export_table_start", "xattr_id_table_start"):
        v = getattr(sb, name)
        if v != ABSENT and v > sb.bytes_used:
            raise CorruptImageError(f"{path}: {name.replace('_', ' ')} beyond the end of the image")
    if sb.fragment_entry_count > file_size // 16 + 1:
        raise CorruptImageError(f"{path}: absurd fragment count {sb.fragment_entry_count}")
    # Every inode takes >= 20 bytes of an 8 KiB metadata block, and a compressed block
    # takes >= 3 bytes on disk: more inodes than that cannot be in the inode table.
    max_inodes = (sb.directory_table_start - sb.inode_table_start) // 3 * (8192 // 20) + 8192 // 20
    if sb.inode_count > max_inodes:
        raise CorruptImageError(f"{path}: absurd inode count {sb.inode_count} for its inode table")
    if sb.export_table_start != ABSENT and sb.flags & L.SQFS_FLAG_EXPORTABLE:
        index_bytes = -(-sb.inode_count // 1024) * 8  # one pointer per 8 KiB block of refs
        nxt = min([v for v in (sb.id_table_start, sb.xattr_id_table_start, sb.bytes_used)
                   if v != ABSENT and v > sb.export_table_start] or [sb.bytes_used])  # fmt: skip
        if sb.export_table_start + index_bytes > nxt:
            raise CorruptImageError(f"{path}: inode count {sb.inode_count} does not fit the export table")
    if (sb.root_inode_ref >> 16) >= sb.directory_table_start - sb.inode_table_start:
        raise CorruptImageError(f"{path}: root inode reference outside the inode table")
    later = [
        v
        for v in (sb.fragment_table_start, sb.export_table_start, sb.id_table_start, sb.xattr_id_table_start)
        if v != ABSENT and v > sb.directory_table_start
    ]
    return min(later) if later else sb.bytes_used


def read_ids(ctx: ThreadContext, sb: L.sqfs_super_t, path: Path) -> list[int]:
    """The image's id table (uids and gids), read with *ctx*."""
    if sb.id_count == 0:
        raise CorruptImageError(f"{path}: id table is empty")
    tbl = lib.sqfs_id_table_create(0)
    if not tbl:
        raise L.error_for(-1, "creating id table")
    try:
        check(lib.sqfs_id_table_read(tbl, ctx.file, ctypes.byref(sb), ctx.cmp), f"{path}: id table")
        out = ctypes.c_uint32()
        ids = []
        for i in range(sb.id_count):
            check(lib.sqfs_id_table_index_to_id(tbl, i, ctypes.byref(out)), f"{path}: id table")
            ids.append(out.value)
        return ids
    finally:
        L.destroy(tbl)


def describe(sb: L.sqfs_super_t) -> ImageInfo:
    """What the superblock says of the image."""
    return ImageInfo(
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


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
