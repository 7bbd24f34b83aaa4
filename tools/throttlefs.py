#!/usr/bin/env python3
"""throttlefs: slow scratch for benchmarks, a read-only FUSE passthrough behind one slow link.

    python tools/throttlefs.py SOURCE MOUNTPOINT --rate-file FILE [--latency 0.0005]

Every read of MOUNTPOINT is served from SOURCE after passing a single first-come-first-served
link of the rate in FILE (bytes/s; 0 = unlimited; re-read on SIGHUP): a request of *n* bytes
occupies the link for *n* / rate seconds behind those already queued, and its reply leaves
when its turn is over plus ``--latency``. So readers sharing the link share its bandwidth
smoothly, request by request, like a network filesystem's client link.

Why not only the blkio throttle of bench_mountd: the blkio controller enforces its limit in
100 ms slices, so a reader at the limit waits up to ~95 ms once per slice with nothing else
going on. Those waits swamp what a reader sees during a tier switch. This link has no slices:
a request waits only behind the bytes queued ahead of it.

The kernel page cache sits above the link (``keep_cache``), as the ext4 page cache sits above
the throttled loop device: data read once is served from memory until dropped. A benchmark
tool: it is a second FUSE filesystem of its own, apart from scratchfs's read path, and it
needs root for ``allow_other`` (mountd, as root, reads through it).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("throttlefs")

TIMEOUT = 1.0  # entry and attribute timeouts: SOURCE may change under a benchmark


def read_rate(path: Path) -> float:
    try:
        rate = float(path.read_text().strip() or 0)
    except (OSError, ValueError) as e:
        raise SystemExit(f"throttlefs: cannot read a rate (bytes/s) from {path}: {e}") from None
    if rate < 0:
        raise SystemExit(f"throttlefs: negative rate in {path}")
    return rate


class Link:
    """One first-come-first-served link of ``rate`` bytes/s (0 = unlimited) plus a fixed latency.

    Pure: times are passed in. :meth:`book` returns when a request of *n* bytes arriving at
    *now* has crossed the link.
    """

    def __init__(self, rate: float, latency: float = 0.0) -> None:
        self.rate = rate
        self.latency = latency
        self.free_at = 0.0  # when the bytes queued so far have crossed

    def book(self, now: float, n: int) -> float:
        if self.rate <= 0:
            return now + self.latency
        start = max(now, self.free_at)
        self.free_at = start + n / self.rate
        return self.free_at + self.latency


class ThrottleFS(pyfuse3.Operations):
    def __init__(self, source: Path, link: Link) -> None:
        super().__init__()
        self.source = source
        self.channel = link
        self.paths: dict[int, Path] = {pyfuse3.ROOT_INODE: source}

    def _attrs(self, path: Path) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        ino = pyfuse3.ROOT_INODE if path == self.source else st.st_ino
        self.paths[ino] = path
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_size, a.st_blksize, a.st_blocks, a.st_rdev = st.st_size, st.st_blksize, st.st_blocks, st.st_rdev
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _path(self, inode: int) -> Path:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(parent_inode) / os.fsdecode(name))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR(os.lstat(self._path(inode)).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        base = self._path(fh)
        try:
            names = sorted(os.listdir(base))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        for i, name in enumerate(names[start_id:], start_id + 1):
            try:
                attrs = self._attrs(base / name)
            except pyfuse3.FUSEError:
                continue  # gone meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i):
                return

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        done = self.channel.book(trio.current_time(), size)
        try:
            data = await trio.to_thread.run_sync(os.pread, fh, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        await trio.sleep_until(done)
        return data

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, f, getattr(st, f))
        out.f_namemax = st.f_namemax
        return out


async def serve(fs: ThrottleFS, mountpoint: str, rate_file: Path) -> None:
    async with trio.open_nursery() as nursery:

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    if sig == signal.SIGHUP:
                        fs.channel.rate = read_rate(rate_file)
                        log.info("rate now %.0f bytes/s", fs.channel.rate)
                        continue
                    pyfuse3.terminate()
                    return

        nursery.start_soon(signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("source", type=Path)
    ap.add_argument("mountpoint")
    ap.add_argument("--rate-file", type=Path, required=True, help="bytes/s (0 = unlimited), re-read on SIGHUP")
    ap.add_argument("--latency", type=float, default=0.0005, help="seconds added to every read (default 0.5 ms)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="throttlefs: %(message)s")
    if not args.source.is_dir():
        print(f"throttlefs: {args.source} is not a directory", file=sys.stderr)
        return 2
    fs = ThrottleFS(args.source.resolve(), Link(read_rate(args.rate_file), args.latency))
    options = {"fsname=throttlefs", "ro", "default_permissions", "nosuid", "nodev"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(serve, fs, args.mountpoint, args.rate_file)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
