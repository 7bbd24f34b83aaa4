"""`scratchfs …` — thin command-line front end. Each command module registers its parsers.

A command module exposes ``register(subparsers)``; every parser it adds sets
``func=handler`` where ``handler(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import ScratchfsError

log = logging.getLogger(__name__)

# Modules that add subcommands, in the order they appear in --help, with the commands each
# adds: only the module of the command being run is imported (start-up time of every call).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "scratchfs.mount_cmd": ("mount", "umount"),
    "scratchfs.image.cmd": ("image",),
    "scratchfs.keepalive.cli": ("keepalive",),
    "scratchfs.jobs_cmd": ("jobs",),
    "scratchfs.status_cmd": ("status", "ctl"),
}

def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def daemon_logging(logfile: str | None, debug: bool = False) -> None:
    """Log handlers for a long-running process: *logfile* (appended) or stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with *command*, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="scratchfs",
        description="Read-only squashfs datasets over FUSE, image tools, and purge keepalive for HPC scratch.",
    )
    parser.add_argument("--version", action="version", version=f"scratchfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, commands in COMMAND_MODULES.items():
        if command is not None and command not in commands:
            continue
        importlib.import_module(name).register(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: ScratchfsError → one line on stderr and its exit code."""
    try:
        return int(args.func(args) or 0)
    except ScratchfsError as e:
        log.debug("command failed", exc_info=True)
        print(f"{args.prog_name if hasattr(args, 'prog_name') else 'scratchfs'}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("scratchfs: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {c for cmds in COMMAND_MODULES.values() for c in cmds}
    parser = build_parser(first if first in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
