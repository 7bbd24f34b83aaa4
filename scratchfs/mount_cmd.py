"""`scratchfs mount IMAGE DIR` and `scratchfs umount DIR`.

``mount`` checks everything it can in the calling process (so mistakes give a one-line error
at once), then forks a daemon that mounts and serves; the command returns only when the
mount is live, or with the daemon's one-line reason when it is not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli import daemon_logging
from .errors import BusyError, EnvironmentProblem, ExternalFailure, NotFoundError, ScratchfsError, UsageError
from .squashfs import Image, SquashfsError
from .units import parse_size

log = logging.getLogger(__name__)

DEFAULT_CACHE = "256M"
READY_TIMEOUT = 60.0


def register(sub: Any) -> None:
    p = sub.add_parser("mount", help="mount a squashfs image read-only through FUSE")
    p.add_argument("image", help="squashfs image file")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in this process (do not detach)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="mount option; supported: allow_other")  # fmt: skip
    p.add_argument("--subdir", default=None, help="serve only this directory of the image")
    p.add_argument("--cache-size", default=DEFAULT_CACHE, help=f"block cache size (default {DEFAULT_CACHE})")
    p.add_argument("--threads", type=int, default=None, help="decompression threads (default: cores)")
    p.add_argument("--log", default=None, help="log file of the daemon (default: state dir)")
    p.add_argument("--debug", action="store_true", help="debug logging (and FUSE debug output)")
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount a scratchfs mount")
    u.add_argument("mountpoint")
    u.add_argument("--lazy", "-z", action="store_true", help="detach now, finish when no longer busy")
    u.set_defaults(func=cmd_umount)


# ---------------------------------------------------------------------- checks
def mount_entries() -> dict[str, str]:
    """mountpoint → filesystem type, from /proc/self/mountinfo (octal escapes decoded)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            sep = parts.index(b"-")
            mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), parts[4])
            out[os.fsdecode(mp)] = parts[sep + 1].decode()
    return out


def check_mountpoint(path: str) -> str:
    mp = os.path.abspath(path)
    if not os.path.lexists(mp):
        raise NotFoundError(f"mountpoint {path} does not exist")
    if not os.path.isdir(mp):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(mp) or mp in mount_entries():
        raise BusyError(f"{path} is already a mount point")
    try:
        if any(os.scandir(mp)):
            raise UsageError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise UsageError(f"mountpoint {path} is not readable by you") from None
    return mp


def check_options(options: list[str]) -> bool:
    allow_other = False
    for group in options:
        for opt in filter(None, group.split(",")):
            if opt == "allow_other":
                allow_other = True
            elif opt in ("ro", "nosuid", "nodev", "default_permissions"):
                pass  # always in force
            else:
                raise UsageError(f"unsupported mount option {opt!r} (supported: allow_other)")
    if allow_other and os.geteuid() != 0:
        with contextlib.suppress(OSError), open("/etc/fuse.conf") as f:
            if any(line.strip() == "user_allow_other" for line in f):
                return True
        raise UsageError("-o allow_other needs root or 'user_allow_other' in /etc/fuse.conf")
    return allow_other


def open_checked(image: str, cache_size: int, subdir: str | None) -> tuple[Image, Any]:
    if not os.path.exists(image):
        raise NotFoundError(f"image {image} does not exist")
    img = Image.open(image, cache_size=cache_size)
    try:
        root = img.resolve(subdir) if subdir else img.root
        if not root.is_dir:
            raise UsageError(f"--subdir {subdir} is not a directory in {image}")
    except SquashfsError as e:
        img.close()
        if e.code == -13:
            raise NotFoundError(f"--subdir {subdir}: no such directory in {image}") from None
        raise
    except BaseException:
        img.close()
        raise
    return img, root


def default_log_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "scratchfs" / "mount.log"


# ----------------------------------------------------------------------- mount
def cmd_mount(args: argparse.Namespace) -> int:
    if not os.path.exists("/dev/fuse"):
        raise EnvironmentProblem("/dev/fuse is missing: load the fuse module or install fuse3")
    cache_size = parse_size(args.cache_size)
    allow_other = check_options(args.options)
    mp = check_mountpoint(args.mountpoint)
    image = os.path.abspath(args.image)
    img, root = open_checked(image, cache_size, args.subdir)
    if args.foreground:
        daemon_logging(None, args.debug)
        return _serve(img, root, image, mp, allow_other, args, ready_fd=None)
    img.close()

    def child(ready_fd: int) -> int:
        img, root = open_checked(image, cache_size, args.subdir)
        return _serve(img, root, image, mp, allow_other, args, ready_fd=ready_fd)

    return run_detached(child, args.log or str(default_log_path()), args.debug, args.mountpoint)


def run_detached(child: Callable[[int], int], logfile: str, debug: bool, mountpoint: str) -> int:
    """Fork a daemon that runs ``child(ready_fd)``; return once it reports the mount live.

    The child writes "ready" to *ready_fd* once serving; its ScratchfsError (or any other
    failure) comes back through the pipe and is printed here as one line with its exit code.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        code = 1
        try:
            os.setsid()
            _detach_stdio()
            daemon_logging(logfile, debug)
            code = child(wfd)
        except ScratchfsError as e:
            log.error("%s", e)
            _tell(wfd, f"error {e.exit_code} {e}")
        except BaseException as e:
            log.exception("daemon failed")
            _tell(wfd, f"error 1 {type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
            os._exit(code)
    os.close(wfd)
    return _wait_ready(rfd, pid, mountpoint)


def _tell(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (msg.replace("\n", " ") + "\n").encode())
        os.close(fd)


def _wait_ready(rfd: int, pid: int, mountpoint: str) -> int:
    import select

    buf = b""
    with os.fdopen(rfd, "rb", buffering=0) as r:
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
        if ready:
            buf = r.read(4096) or b""
    msg = buf.decode(errors="replace").strip()
    if msg == "ready":
        return 0
    if msg.startswith("error "):
        _, code, text = msg.split(" ", 2)
        print(f"scratchfs: error: {text}", file=sys.stderr)
        return int(code) if code.isdigit() and int(code) > 0 else 1
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    print(f"scratchfs: error: mount daemon did not come up on {mountpoint} (see its log)", file=sys.stderr)
    return ExternalFailure.exit_code


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _serve(img: Image, root: Any, image: str, mp: str, allow_other: bool, args: argparse.Namespace,
           ready_fd: int | None) -> int:  # fmt: skip
    import trio

    from .fuse_ops import Operations, mount_options, serve
    from .tiers import Dataset

    ds = Dataset(os.path.basename(image), img)
    ops = Operations(ds, subdir=root if root is not img.root else None, workers=args.threads)
    opts = mount_options(f"scratchfs:{image}", allow_other=allow_other, debug=args.debug)

    def on_ready() -> None:
        _raise_readahead(mp)
        log.info("serving %s on %s", image, mp)
        _tell(ready_fd, "ready")

    try:
        trio.run(serve, ops, mp, opts, on_ready)
    except RuntimeError as e:  # pyfuse3.init failing to mount
        raise ExternalFailure(f"cannot mount on {mp}: {e}") from None
    finally:
        img.close()
    return 0


def _raise_readahead(mp: str, kb: int = 1024) -> None:
    """Ask for 1 MiB read requests (root only): the FUSE bdi defaults to 128 KiB."""
    try:
        dev = os.stat(mp).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("could not raise read_ahead_kb: %s", e)


# ---------------------------------------------------------------------- umount
def cmd_umount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    if not os.path.exists(mp):
        raise NotFoundError(f"{args.mountpoint} does not exist")
    fstype = mount_entries().get(mp)
    if fstype is None:
        raise UsageError(f"{args.mountpoint} is not mounted")
    if not fstype.startswith("fuse"):
        raise UsageError(f"{args.mountpoint} is not a scratchfs mount ({fstype})")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] + (["-z"] if args.lazy else []) + [mp] if tool else ["umount"] + (["-l"] if args.lazy else []) + [mp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        reason = msg[-1] if msg else f"exit {res.returncode}"
        if "busy" in reason.lower():
            raise BusyError(f"{args.mountpoint} is busy (files open?); use --lazy to detach anyway")
        raise ExternalFailure(f"cannot unmount {args.mountpoint}: {reason}")
    return 0
