"""`scratchfs image build | inspect | verify` — argument parsing and output only."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UsageError
from ..units import format_size, parse_size

log = logging.getLogger(__name__)


def _block_size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("image", help="build, inspect and verify squashfs dataset images")
    sub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build", help="build a squashfs image from a directory")
    b.add_argument("src", metavar="SRC_DIR")
    b.add_argument("out", metavar="OUT.sqfs")
    b.add_argument("--compression", default="zstd", choices=["zstd", "gzip", "xz", "lz4", "lzo"])
    b.add_argument("--level", type=int, help="compression level (zstd 1-22, default 3; gzip/lzo 1-9)")
    b.add_argument("--block-size", type=_block_size, help="128K..1M, a power of two (default: from the data)")
    b.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out matching entries: a name pattern (any depth) or a path pattern with '/'")
    b.add_argument("--threads", type=int, help="compressor threads (default: all cores)")
    b.add_argument("--reproducible", action="store_true",
                   help="byte-identical images from identical trees (creation time from the tree)")
    b.add_argument("--normalize-permissions", action="store_true",
                   help="dirs 0755 and files 0644 in the image (the source is not touched)")
    b.add_argument("--all-root", action="store_true", help="every entry owned by root in the image")
    b.add_argument("--force", action="store_true", help="replace OUT when it exists")
    b.add_argument("--skip-unreadable", action="store_true", help="leave unreadable entries out instead of failing")
    b.add_argument("--tool", choices=["mksquashfs", "gensquashfs"], help="builder (default mksquashfs)")
    b.add_argument("--no-checksum", action="store_true", help="do not checksum the image for its manifest")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("inspect", help="describe a squashfs image")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="decode every file of an image, optionally compare with a source tree")
    v.add_argument("image", metavar="IMAGE")
    v.add_argument("--against", metavar="SRC_DIR", help="compare names, types, sizes, modes, links and contents")
    v.add_argument("--threads", type=int, help="reader threads (default: all cores)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temp files are removed on the way out."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_build(args: argparse.Namespace) -> int:
    from .build import BuildOptions, build_image
    from .progress import Reporter

    opts = BuildOptions(
        compression=args.compression, level=args.level, block_size=args.block_size, excludes=list(args.exclude),
        threads=args.threads, reproducible=args.reproducible, normalize_permissions=args.normalize_permissions,
        all_root=args.all_root, force=args.force, skip_unreadable=args.skip_unreadable, tool=args.tool,
        checksum=not args.no_checksum,
    )
    with _sigterm_interrupts():
        res = build_image(args.src, args.out, opts, reporter=Reporter("build"))
    m = res.manifest
    if args.json:
        _dump({"image": str(res.image), "manifest": str(res.manifest_path), "seconds": round(res.seconds, 3),
               **m.to_json()})
        return 0
    ratio = m.image_bytes / m.logical_bytes if m.logical_bytes else 0.0
    print(
        f"{res.image}: {m.counts['files']} files, {m.counts['dirs']} dirs, {m.counts['symlinks']} symlinks; "
        f"{format_size(m.logical_bytes)} → {format_size(m.image_bytes)} ({ratio:.1%}) "
        f"with {res.tool} {m.options['compression']}"
        f"{'' if m.options['level'] is None else '-' + str(m.options['level'])}, "
        f"{format_size(res.block_size)} blocks, in {res.seconds:.1f} s"
    )
    if res.skipped:
        print(f"left out {len(res.skipped)} unreadable entries")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import format_report, inspect_image

    report = inspect_image(args.image)
    if args.json:
        _dump(report)
    else:
        sys.stdout.write(format_report(report))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .verify import format_result, verify_image

    with _sigterm_interrupts():
        result = verify_image(args.image, against=args.against, threads=args.threads, reporter=Reporter("verify"))
    if args.json:
        _dump(result.to_json())
    else:
        sys.stdout.write(format_result(result))
    return 0 if result.ok else 1
