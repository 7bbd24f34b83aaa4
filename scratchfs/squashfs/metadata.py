"""Metadata blocks of a squashfs image (the inode and directory tables): read, decompressed,
cached, and followed from block to block as one stream, as libsquashfs's metadata reader does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from . import _lib as L

META = L.SQFS_META_BLOCK_SIZE


class MetaBlocks:
    """Uncompressed metadata blocks of one image: position → (bytes, position of the next
    block), at most *limit* of them. Read without the lock (one dict lookup); added under it,
    oldest first out. *decompress* decodes a stored block, None where it does not decode."""

    def __init__(self, fd: int, decompress: Callable[[bytes], bytes | None], limit: int) -> None:
        self._fd = fd
        self._decompress = decompress
        self._limit = max(1, limit)
        self._lock = threading.Lock()
        self.cached: dict[int, tuple[bytes, int]] = {}

    def block(self, pos: int, start: int, limit: int) -> tuple[bytes, int] | None:
        """(uncompressed bytes, position of the next block) of the metadata block at *pos* of the
        table [start, limit), or None where libsquashfs's metadata reader would fail to load it.

        The checks are the reader's own: the block starts inside the table, its stored size is
        at most 8 KiB, it ends inside the table, it decompresses to at least one byte.
        """
        if pos < start or pos >= limit:
            return None
        hit = self.cached.get(pos)
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
            data = self._decompress(raw[2 : 2 + size])
        if not data:
            return None
        hit = (data, pos + 2 + size)
        with self._lock:
            cache = self.cached
            cache[pos] = hit
            while len(cache) > self._limit:
                del cache[next(iter(cache))]
        return hit

    def span(self, pos: int, off: int, n: int, start: int, limit: int) -> bytes:
        """Up to *n* bytes of the metadata stream from block *pos*, offset *off*, following the
        chain of blocks as libsquashfs's reader does; short where the chain breaks (callers
        that need the missing bytes leave the decoding to libsquashfs)."""
        blk = self.block(pos, start, limit)
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
            blk = self.block(nxt, start, limit)
            if blk is None:
                break
            data, nxt = blk
            piece = data[: n - got]
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

