"""`scratchfs-mountd --config FILE [--foreground] [--record-trace FILE]`.

Everything that can be checked is checked in the calling process (configuration, mount
point, FUSE), so mistakes are one line and exit before anything is mounted. Without
``--foreground`` the daemon forks and the command returns only once the mount is live (or
with the daemon's one-line reason), as ``scratchfs mount`` does. Under systemd
(``Type=notify``, ``--foreground``) READY=1 is sent once the mount is live.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from scratchfs import __version__
from scratchfs.cli import daemon_logging
from scratchfs.errors import BusyError, EnvironmentProblem, ExternalFailure, ScratchfsError
from scratchfs.locking import Lock, is_locked
from scratchfs.mount_cmd import _tell, check_mountpoint, run_detached

from . import config as cfgmod
from .cachestore import LOCK_NAME
from .daemon import Daemon, Settings
from .notify import notify

log = logging.getLogger("mountd")

DEFAULT_LOG = "/var/log/scratchfs-mountd.log"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchfs-mountd", description="Serve every dataset of the data "
                                "directories under one FUSE mount; promote hot ones to the local SSD.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"scratchfs-mountd {__version__}")
    p.add_argument("--config", default=str(cfgmod.DEFAULT_PATH), help=f"config file (default {cfgmod.DEFAULT_PATH})")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in this process (systemd: Type=notify)")
    p.add_argument("--record-trace", metavar="FILE", help="record a read trace for tools/simulate_traces.py")
    p.add_argument("--log", metavar="FILE", help=f"log file when detached (default {DEFAULT_LOG})")
    p.add_argument("--debug", action="store_true", help="debug logging")
    cfgmod.add_override_arguments(p)
    return p


def load_settings(args: argparse.Namespace) -> Settings:
    """The config file with the command line's settings on top (flag > file > default)."""
    cfg = cfgmod.load_config(args.config)
    cfg = cfgmod.apply_overrides(cfg, cfgmod.overrides_from_args(args))
    return Settings.of(cfg, debug=args.debug)


def check(settings: Settings) -> None:
    """Problems found before forking: one line each."""
    if not os.path.exists("/dev/fuse"):
        raise EnvironmentProblem("/dev/fuse is missing: load the fuse module or install fuse3")
    check_mountpoint(str(settings.mountdir))
    lock = settings.cachedir / LOCK_NAME
    if is_locked(lock):
        raise BusyError(f"another scratchfs-mountd uses {settings.cachedir}")
    for d in settings.datadirs:
        if not d.is_dir():
            log.warning("data directory %s does not exist (yet)", d)


def serve(settings: Settings, args: argparse.Namespace, ready_fd: int | None) -> int:
    import trio

    def reload() -> Settings:
        # The same flags on top of the file again; the daemon keeps restart-only keys as they run.
        return load_settings(args)

    def on_ready() -> None:
        _tell(ready_fd, "ready")
        notify("READY=1\nSTATUS=serving " + str(settings.mountdir))

    settings.cachedir.mkdir(parents=True, exist_ok=True)
    with Lock(settings.cachedir / LOCK_NAME, what=f"scratchfs-mountd for {settings.cachedir}"):
        daemon = Daemon(settings, reload=reload, record_trace=args.record_trace, on_ready=on_ready)
        try:
            trio.run(daemon.run)
        except BaseException as e:
            first = _first_error(e)
            if isinstance(first, ScratchfsError):
                raise first from None
            if isinstance(first, RuntimeError):  # pyfuse3.init failing to mount
                raise ExternalFailure(f"cannot mount on {settings.mountdir}: {first}") from None
            if isinstance(first, OSError):
                raise ExternalFailure(f"scratchfs-mountd: {first}") from None
            raise
        finally:
            notify("STOPPING=1")
    return 0


def _first_error(e: BaseException) -> BaseException:
    """The first leaf of an exception group (trio nurseries wrap what their tasks raise)."""
    while isinstance(getattr(e, "exceptions", None), (list, tuple)) and e.exceptions:  # type: ignore[attr-defined]
        e = e.exceptions[0]  # type: ignore[attr-defined]
    return e


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
        check(settings)
        if args.foreground:
            daemon_logging(args.log, args.debug)
            return serve(settings, args, ready_fd=None)
    except ScratchfsError as e:
        print(f"scratchfs-mountd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return run_detached(lambda ready_fd: serve(settings, args, ready_fd=ready_fd), args.log or DEFAULT_LOG,
                        args.debug, str(settings.mountdir))  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
