"""One thread's libsquashfs objects for an image, and the native block loader.

libsquashfs reader objects are not thread-safe: every thread reading an image gets its own
:class:`ThreadContext` (file handle, decompressor, metadata readers, xattr reader).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from ..native import load_built
from . import _lib as L
from ._lib import check, lib
from .errors import CorruptImageError, ImageIOError
from .metadata import META


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
load_block_native: Any = _blockload.scratchfs_load_block if _blockload is not None else None



class ThreadContext:
    """One thread's libsquashfs objects for the image at *path* (superblock *sb*, directory
    table ending at *dir_table_end*). Never touched by another thread."""

    def __init__(self, path: Path, sb: L.sqfs_super_t, dir_table_end: int) -> None:
        self.path = path
        self.sb = sb
        self.dir_table_end = dir_table_end
        self.file = lib.sqfs_open_file(os.fsencode(path), L.SQFS_FILE_OPEN_READ_ONLY)
        if not self.file:
            raise ImageIOError(f"{path}: cannot open image")
        self.cmp: Any = None
        self.inode_reader: Any = None
        self.dir_reader: Any = None
        self.xattr_reader: Any = None
        try:
            cfg = L.sqfs_compressor_config_t()
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
            if load_block_native is not None and sb.compression_id != L.SQFS_COMP_LZO:
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
        sb = self.sb
        for name in ("dir_reader", "inode_reader"):
            L.destroy(getattr(self, name, None))
            setattr(self, name, None)
        self.inode_reader = lib.sqfs_meta_reader_create(self.file, self.cmp, sb.inode_table_start,
                                                        sb.directory_table_start)  # fmt: skip
        self.dir_reader = lib.sqfs_meta_reader_create(self.file, self.cmp, sb.directory_table_start,
                                                      self.dir_table_end)  # fmt: skip
        if not self.inode_reader or not self.dir_reader:
            raise L.error_for(-1, "creating metadata readers")

    def load(self, fd: int, off: int, n: int) -> bytes:
        """Compressed data block of *n* bytes at *off*, read and decoded in one native call."""
        cmp, do_block, inbuf, outbuf, limit, length, detail = self.native  # type: ignore[misc]
        status = load_block_native(fd, off, n, cmp, do_block, inbuf, outbuf, limit, length, detail)
        if status == _LOAD_OK:
            return ctypes.string_at(outbuf, self.result[0])
        path = self.path
        if status == _LOAD_IO:
            code = self.result[1]
            raise OSError(code, f"{os.strerror(code)}: reading {path} at {off}")
        if status == _LOAD_SHORT:
            raise ImageIOError(f"{path}: short read at {off} (image truncated?)")
        raise CorruptImageError(f"{path}: data block does not decompress ({self.result[1]})")

    def decompress(self, raw: bytes, limit: int) -> bytes:
        n = self._do_block(self.cmp, raw, len(raw), self.outbuf, limit)
        if n <= 0:
            raise CorruptImageError(f"{self.path}: data block does not decompress ({n})")
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
                    lib.sqfs_xattr_reader_load(xr, ctypes.byref(self.sb), self.file, self.cmp),
                    f"{self.path}: reading xattr table",
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
