"""Our own squashfs reader over libsquashfs (squashfs-tools-ng 1.x) through ctypes."""

from .cache import BlockCache
from .directory import DirListing
from .errors import (
    CorruptImageError,
    ImageIOError,
    LibraryError,
    NotSquashfsError,
    SquashfsError,
    UnsupportedImageError,
)
from .image import Image
from .inode import Inode
from .superblock import ImageInfo

__all__ = [
    "BlockCache",
    "CorruptImageError",
    "DirListing",
    "Image",
    "ImageIOError",
    "ImageInfo",
    "Inode",
    "LibraryError",
    "NotSquashfsError",
    "SquashfsError",
    "UnsupportedImageError",
]
