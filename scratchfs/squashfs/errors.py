"""Typed exceptions for every libsquashfs error code."""

from __future__ import annotations

import errno

from ..errors import BadImageError


class SquashfsError(BadImageError):
    """A libsquashfs call failed or the image holds an impossible value."""

    code = 0
    errno = errno.EIO

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotSquashfsError(SquashfsError):
    """The file does not start with a squashfs superblock."""


class CorruptImageError(SquashfsError):
    """A structure of the image is damaged or out of bounds."""


class UnsupportedImageError(SquashfsError):
    """A valid image that uses a feature we cannot read (e.g. unknown compressor)."""


class LibraryError(SquashfsError):
    """libsquashfs failed for a reason that is not the image's fault (allocation, internal)."""


class ImageIOError(SquashfsError):
    """Reading the image file failed (I/O error, file shrank)."""


# SQFS_ERROR_* → (exception class, description). One table, used by _lib.check().
SQFS_ERRORS: dict[int, tuple[type[SquashfsError], str]] = {
    -1: (LibraryError, "out of memory"),
    -2: (ImageIOError, "I/O error reading the image"),
    -3: (CorruptImageError, "decompression failed (corrupt data)"),
    -4: (LibraryError, "internal libsquashfs error"),
    -5: (CorruptImageError, "corrupted structure"),
    -6: (UnsupportedImageError, "unsupported feature"),
    -7: (CorruptImageError, "size overflow (corrupt or malicious image)"),
    -8: (CorruptImageError, "out-of-bounds reference"),
    -9: (NotSquashfsError, "no squashfs magic"),
    -10: (UnsupportedImageError, "unsupported squashfs version"),
    -11: (CorruptImageError, "invalid block size in superblock"),
    -12: (CorruptImageError, "not a directory where one was expected"),
    -13: (CorruptImageError, "no such entry"),
    -14: (CorruptImageError, "link loop"),
    -15: (CorruptImageError, "not a regular file where one was expected"),
    -16: (LibraryError, "invalid argument"),
    -17: (LibraryError, "call sequence error"),
}


def error_for(code: int, what: str) -> SquashfsError:
    cls, desc = SQFS_ERRORS.get(code, (SquashfsError, f"unknown libsquashfs error {code}"))
    return cls(f"{what}: {desc}", code)
