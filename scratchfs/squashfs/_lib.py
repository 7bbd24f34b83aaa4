"""ctypes declarations for libsquashfs 1.x (squashfs-tools-ng, Debian package libsquashfs1).

Only what the reader needs. Structures mirror <sqfs/*.h> of libsquashfs 1.2; every call that
returns an int goes through check(), which turns SQFS_ERROR codes into typed exceptions.
ctypes releases the GIL for the duration of each foreign call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_char_p,
    c_int,
    c_int16,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

from ..errors import EnvironmentProblem
from .errors import error_for

SQFS_FILE_OPEN_READ_ONLY = 0x01
SQFS_COMP_FLAG_UNCOMPRESS = 0x8000

SQFS_FLAG_NO_FRAGMENTS = 0x0010
SQFS_FLAG_ALWAYS_FRAGMENTS = 0x0020
SQFS_FLAG_NO_DUPLICATES = 0x0040
SQFS_FLAG_EXPORTABLE = 0x0080
SQFS_FLAG_NO_XATTRS = 0x0200
SQFS_FLAG_COMPRESSOR_OPTIONS = 0x0400

SQFS_META_BLOCK_SIZE = 8192
SQFS_BLOCK_UNCOMPRESSED = 1 << 24
SQFS_BLOCK_SIZE_MASK = SQFS_BLOCK_UNCOMPRESSED - 1
XATTR_NONE = 0xFFFFFFFF

COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}


class sqfs_object_t(Structure):
    pass


_DESTROY = ctypes.CFUNCTYPE(None, POINTER(sqfs_object_t))
sqfs_object_t._fields_ = [("destroy", _DESTROY), ("copy", c_void_p)]


class sqfs_super_t(Structure):
    _fields_ = [
        ("magic", c_uint32),
        ("inode_count", c_uint32),
        ("modification_time", c_uint32),
        ("block_size", c_uint32),
        ("fragment_entry_count", c_uint32),
        ("compression_id", c_uint16),
        ("block_log", c_uint16),
        ("flags", c_uint16),
        ("id_count", c_uint16),
        ("version_major", c_uint16),
        ("version_minor", c_uint16),
        ("root_inode_ref", c_uint64),
        ("bytes_used", c_uint64),
        ("id_table_start", c_uint64),
        ("xattr_id_table_start", c_uint64),
        ("inode_table_start", c_uint64),
        ("directory_table_start", c_uint64),
        ("fragment_table_start", c_uint64),
        ("export_table_start", c_uint64),
    ]


class _opt(Union):
    _fields_ = [("padd0", c_uint64 * 2)]


class sqfs_compressor_config_t(Structure):
    _fields_ = [("id", c_uint16), ("flags", c_uint16), ("block_size", c_uint32), ("level", c_uint32), ("opt", _opt)]


class sqfs_compressor_t(Structure):
    pass


_DO_BLOCK = ctypes.CFUNCTYPE(c_int32, POINTER(sqfs_compressor_t), c_void_p, c_uint32, c_void_p, c_uint32)
_RW_OPTIONS = ctypes.CFUNCTYPE(c_int, POINTER(sqfs_compressor_t), c_void_p)
sqfs_compressor_t._fields_ = [
    ("base", sqfs_object_t),
    ("get_configuration", c_void_p),
    ("write_options", _RW_OPTIONS),
    ("read_options", _RW_OPTIONS),
    ("do_block", _DO_BLOCK),
]


class sqfs_inode_t(Structure):
    _fields_ = [
        ("type", c_uint16),
        ("mode", c_uint16),
        ("uid_idx", c_uint16),
        ("gid_idx", c_uint16),
        ("mod_time", c_uint32),
        ("inode_number", c_uint32),
    ]


class _dev(Structure):
    _fields_ = [("nlink", c_uint32), ("devno", c_uint32)]


class _dev_ext(Structure):
    _fields_ = [("nlink", c_uint32), ("devno", c_uint32), ("xattr_idx", c_uint32)]


class _ipc(Structure):
    _fields_ = [("nlink", c_uint32)]


class _ipc_ext(Structure):
    _fields_ = [("nlink", c_uint32), ("xattr_idx", c_uint32)]


class _slink(Structure):
    _fields_ = [("nlink", c_uint32), ("target_size", c_uint32)]


class _slink_ext(Structure):
    _fields_ = [("nlink", c_uint32), ("target_size", c_uint32), ("xattr_idx", c_uint32)]


class _file(Structure):
    _fields_ = [
        ("blocks_start", c_uint32),
        ("fragment_index", c_uint32),
        ("fragment_offset", c_uint32),
        ("file_size", c_uint32),
    ]


class _file_ext(Structure):
    _fields_ = [
        ("blocks_start", c_uint64),
        ("file_size", c_uint64),
        ("sparse", c_uint64),
        ("nlink", c_uint32),
        ("fragment_idx", c_uint32),
        ("fragment_offset", c_uint32),
        ("xattr_idx", c_uint32),
    ]


class _dir(Structure):
    _fields_ = [
        ("start_block", c_uint32),
        ("nlink", c_uint32),
        ("size", c_uint16),
        ("offset", c_uint16),
        ("parent_inode", c_uint32),
    ]


class _dir_ext(Structure):
    _fields_ = [
        ("nlink", c_uint32),
        ("size", c_uint32),
        ("start_block", c_uint32),
        ("parent_inode", c_uint32),
        ("inodex_count", c_uint16),
        ("offset", c_uint16),
        ("xattr_idx", c_uint32),
    ]


class _inode_data(Union):
    _fields_ = [
        ("dev", _dev),
        ("dev_ext", _dev_ext),
        ("ipc", _ipc),
        ("ipc_ext", _ipc_ext),
        ("slink", _slink),
        ("slink_ext", _slink_ext),
        ("file", _file),
        ("file_ext", _file_ext),
        ("dir", _dir),
        ("dir_ext", _dir_ext),
    ]


class sqfs_inode_generic_t(Structure):
    _fields_ = [
        ("base", sqfs_inode_t),
        ("payload_bytes_available", c_uint32),
        ("payload_bytes_used", c_uint32),
        ("data", _inode_data),
    ]


INODE_EXTRA_OFFSET = ctypes.sizeof(sqfs_inode_generic_t)


class sqfs_dir_entry_t(Structure):
    _fields_ = [("offset", c_uint16), ("inode_diff", c_int16), ("type", c_uint16), ("size", c_uint16)]


DIR_ENTRY_NAME_OFFSET = ctypes.sizeof(sqfs_dir_entry_t)


class _rd_pos(Structure):
    _fields_ = [("block", c_uint64), ("offset", c_size_t), ("size", c_size_t)]


class sqfs_readdir_state_t(Structure):
    _fields_ = [
        ("init", _rd_pos),
        ("current", _rd_pos),
        ("entries", c_size_t),
        ("inum_base", c_uint32),
        ("inode_block", c_uint64),
    ]


class sqfs_fragment_t(Structure):
    _fields_ = [("start_offset", c_uint64), ("size", c_uint32), ("pad0", c_uint32)]


class sqfs_xattr_entry_t(Structure):
    _fields_ = [("type", c_uint16), ("size", c_uint16)]


XATTR_KEY_OFFSET = ctypes.sizeof(sqfs_xattr_entry_t)


class sqfs_xattr_value_t(Structure):
    _fields_ = [("size", c_uint32)]


XATTR_VALUE_OFFSET = ctypes.sizeof(sqfs_xattr_value_t)


class sqfs_xattr_id_t(Structure):
    _fields_ = [("xattr", c_uint64), ("count", c_uint32), ("size", c_uint32)]


P = POINTER
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "sqfs_open_file": (c_void_p, [c_char_p, c_uint32]),
    "sqfs_super_read": (c_int, [P(sqfs_super_t), c_void_p]),
    "sqfs_compressor_config_init": (c_int, [P(sqfs_compressor_config_t), c_int, c_size_t, c_uint16]),
    "sqfs_compressor_create": (c_int, [P(sqfs_compressor_config_t), P(P(sqfs_compressor_t))]),
    "sqfs_meta_reader_create": (c_void_p, [c_void_p, P(sqfs_compressor_t), c_uint64, c_uint64]),
    "sqfs_meta_reader_read_inode": (c_int, [c_void_p, P(sqfs_super_t), c_uint64, c_size_t, P(c_void_p)]),
    "sqfs_readdir_state_init": (c_int, [P(sqfs_readdir_state_t), P(sqfs_super_t), P(sqfs_inode_generic_t)]),
    "sqfs_meta_reader_readdir": (
        c_int,
        [c_void_p, P(sqfs_readdir_state_t), P(c_void_p), P(c_uint32), P(c_uint64)],
    ),
    "sqfs_id_table_create": (c_void_p, [c_uint32]),
    "sqfs_id_table_read": (c_int, [c_void_p, c_void_p, P(sqfs_super_t), P(sqfs_compressor_t)]),
    "sqfs_id_table_index_to_id": (c_int, [c_void_p, c_uint16, P(c_uint32)]),
    "sqfs_frag_table_create": (c_void_p, [c_uint32]),
    "sqfs_frag_table_read": (c_int, [c_void_p, c_void_p, P(sqfs_super_t), P(sqfs_compressor_t)]),
    "sqfs_frag_table_lookup": (c_int, [c_void_p, c_uint32, P(sqfs_fragment_t)]),
    "sqfs_frag_table_get_size": (c_size_t, [c_void_p]),
    "sqfs_xattr_reader_create": (c_void_p, [c_uint32]),
    "sqfs_xattr_reader_load": (c_int, [c_void_p, P(sqfs_super_t), c_void_p, P(sqfs_compressor_t)]),
    "sqfs_xattr_reader_get_desc": (c_int, [c_void_p, c_uint32, P(sqfs_xattr_id_t)]),
    "sqfs_xattr_reader_seek_kv": (c_int, [c_void_p, P(sqfs_xattr_id_t)]),
    "sqfs_xattr_reader_read_key": (c_int, [c_void_p, P(P(sqfs_xattr_entry_t))]),
    "sqfs_xattr_reader_read_value": (c_int, [c_void_p, P(sqfs_xattr_entry_t), P(P(sqfs_xattr_value_t))]),
    "sqfs_get_xattr_prefix": (c_char_p, [c_int]),
    "sqfs_inode_get_xattr_index": (c_int, [P(sqfs_inode_generic_t), P(c_uint32)]),
    "sqfs_free": (None, [c_void_p]),
}


class _Lib:
    """The loaded library; attribute access gives typed foreign functions."""

    def __init__(self) -> None:
        self._dll: ctypes.CDLL | None = None

    def _load(self) -> ctypes.CDLL:
        names = ["libsquashfs.so.1", ctypes.util.find_library("squashfs") or ""]
        last: OSError | None = None
        for name in names:
            if not name:
                continue
            try:
                dll = ctypes.CDLL(name)
                break
            except OSError as e:
                last = e
        else:
            raise EnvironmentProblem(
                "libsquashfs 1.x not found: install the Debian package 'libsquashfs1' "
                f"(squashfs-tools-ng){f' ({last})' if last else ''}"
            )
        for fname, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(dll, fname)
            fn.restype = restype
            fn.argtypes = argtypes
        return dll

    def __getattr__(self, name: str) -> Any:
        if self._dll is None:
            self._dll = self._load()
        return getattr(self._dll, name)


lib = _Lib()


class _LZO:
    """LZO decompression through liblzo2: Debian's libsquashfs is built without LZO.

    ``compressor()`` gives a sqfs_compressor_t whose do_block is a ctypes callback, so
    libsquashfs' metadata readers can use it; data blocks call ``decompress`` directly.
    """

    def __init__(self) -> None:
        self._dll: ctypes.CDLL | None = None

    def _fn(self) -> Any:
        if self._dll is None:
            try:
                self._dll = ctypes.CDLL(ctypes.util.find_library("lzo2") or "liblzo2.so.2")
            except OSError as e:
                raise EnvironmentProblem(f"LZO image but liblzo2 is missing: install the Debian package 'liblzo2-2' ({e})") from None
            fn = self._dll.lzo1x_decompress_safe
            fn.restype = c_int
            fn.argtypes = [c_void_p, c_size_t, c_void_p, POINTER(c_size_t), c_void_p]
        return self._dll.lzo1x_decompress_safe

    def decompress_into(self, src: Any, size: int, out: Any, outsize: int) -> int:
        n = c_size_t(outsize)
        ret = self._fn()(src, size, out, ctypes.byref(n), None)
        return int(n.value) if ret == 0 else -3

    def compressor(self) -> tuple[Any, list[Any]]:
        """A (POINTER(sqfs_compressor_t), keepalive list) pair backed by liblzo2."""
        self._fn()
        cmp = sqfs_compressor_t()
        keep: list[Any] = [cmp]

        def _destroy(_obj: Any) -> None:
            return None

        def _options(_cmp: Any, _file: Any) -> int:
            return 0  # LZO options (algorithm, level) only matter for compressing

        def _do_block(_cmp: Any, src: Any, size: int, out: Any, outsize: int) -> int:
            return self.decompress_into(src, size, out, outsize)

        cbs = [_DESTROY(_destroy), _RW_OPTIONS(_options), _RW_OPTIONS(_options), _DO_BLOCK(_do_block)]
        keep.extend(cbs)
        cmp.base.destroy = cbs[0]
        cmp.write_options = cbs[1]
        cmp.read_options = cbs[2]
        cmp.do_block = cbs[3]
        return ctypes.pointer(cmp), keep


lzo = _LZO()
SQFS_COMP_LZO = 3


def check(ret: int, what: str) -> int:
    """Raise the typed exception for a negative libsquashfs return code."""
    if ret < 0:
        raise error_for(ret, what)
    return ret


def destroy(obj: int | None) -> None:
    """sqfs_destroy() is static inline in the header: call the object's destroy pointer."""
    if obj:
        o = ctypes.cast(obj, POINTER(sqfs_object_t))
        o.contents.destroy(o)


def free(ptr: Any) -> None:
    if ptr:
        lib.sqfs_free(ctypes.cast(ptr, c_void_p))


__all__ = ["lib", "check", "destroy", "free", "c_uint8"]
