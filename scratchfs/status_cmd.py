"""`scratchfs status [--json]` and `scratchfs ctl pin|unpin|prefetch|evict|reload NAME`.

Both talk to scratchfs-mountd over its control socket: one JSON request line, one JSON reply
line. Anyone may ask for the status; changes are refused by the daemon unless the caller is
root or in its control group.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from typing import Any

from .errors import (
    BadImageError,
    BusyError,
    EnvironmentProblem,
    ExternalFailure,
    NoSpaceError,
    NotFoundError,
    PermissionRefused,
    ScratchfsError,
    UsageError,
)
from .units import format_size

DEFAULT_SOCKET = "/run/scratchfs/mountd.sock"
SOCKET_ENV = "SCRATCHFS_MOUNTD_SOCKET"
TIMEOUT = 30.0
ACTIONS = ("pin", "unpin", "prefetch", "evict", "reload")

_BY_CODE: dict[int, type[ScratchfsError]] = {
    c.exit_code: c
    for c in (UsageError, NotFoundError, BadImageError, BusyError, PermissionRefused, EnvironmentProblem,
              NoSpaceError, ExternalFailure)  # fmt: skip
}


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="datasets served by scratchfs-mountd: tier, throughput, hit ratio")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", default=None, help=f"mountd control socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    p.set_defaults(func=cmd_status)

    c = sub.add_parser("ctl", help="control scratchfs-mountd (root or its control group)")
    c.add_argument("action", choices=ACTIONS)
    c.add_argument("name", nargs="?", help="dataset name (not for reload)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--socket", default=None, help=f"mountd control socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    c.set_defaults(func=cmd_ctl)


def socket_path(given: str | None) -> str:
    return given or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def request(path: str, req: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one request; the reply's error becomes the matching ScratchfsError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotFoundError(f"scratchfs-mountd is not running (no control socket at {path})") from None
        except PermissionError:
            raise PermissionRefused(f"cannot connect to {path}: permission denied") from None
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(1 << 20)
            if not data:
                break
            buf += data
    except TimeoutError:
        raise ExternalFailure(f"scratchfs-mountd did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise ExternalFailure(f"talking to scratchfs-mountd at {path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ExternalFailure("scratchfs-mountd sent a reply that is not JSON") from None
    if not reply.get("ok"):
        code = int(reply.get("code") or 1)
        cls = _BY_CODE.get(code, ScratchfsError)
        err = cls(str(reply.get("error") or "request failed"))
        if cls is ScratchfsError:
            err.exit_code = code
        raise err
    return dict(reply)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def format_status(st: dict[str, Any]) -> str:
    rows = [("DATASET", "TIER", "SIZE", "RATE/s", "SCRATCH", "CACHE", "HIT", "COPIED", "PIN", "PROMOTED", "DEMOTED",
             "COPY")]
    notes = []
    for d in st.get("datasets", []):
        copy = d.get("copy")
        copy_text = f"{copy['phase']} {copy['fraction'] * 100:.0f}%" if copy else "-"
        hit = d.get("hit_ratio")
        rows.append((
            d["name"], d["tier"], format_size(d["size"]), format_size(d["rate"]), format_size(d["bytes_scratch"]),
            format_size(d["bytes_cache"]), "-" if hit is None else f"{hit * 100:.0f}%",
            format_size(d.get("bytes_copied", 0)), "yes" if d["pinned"] else "-",
            _when(d.get("last_promotion")), _when(d.get("last_demotion")), copy_text,
        ))  # fmt: skip
        if d.get("backing_gone"):
            notes.append(f"{d['name']}: backing image {d.get('backing')} is gone; served from the cached copy")
        if d.get("kept_copy"):
            notes.append(f"{d['name']}: its copy {d['kept_copy']} is kept until its space is needed")
        if part := d.get("partial_copy"):
            notes.append(f"{d['name']}: its cancelled copy {part['file']} ({format_size(part['bytes_done'])} of "
                         f"{format_size(d['size'])}) is kept until its space is needed; the next copy goes on from it")
        if d.get("last_error"):
            notes.append(f"{d['name']}: last copy failed ({d['copy_failures']}x): {d['last_error']}")
    for r in st.get("refused", []):
        notes.append(f"{r['name']}: refused, several images map to it: {', '.join(r['images'])}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    c = st.get("cache", {})
    head = f"{st.get('mountdir')}: {len(st.get('datasets', []))} datasets; cache {st.get('cachedir')}"
    if c.get("budget") is not None:
        head += f": {format_size(c.get('used') or 0)} used of {format_size(c['budget'])} budget"
        if c.get("reclaimable"):
            head += f", {format_size(c['reclaimable'])} kept reclaimable"
    return "\n".join([head, *lines, *notes])


def cmd_status(args: argparse.Namespace) -> int:
    reply = request(socket_path(args.socket), {"op": "status"})
    st = reply["status"]
    if args.json:
        json.dump(st, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_status(st))
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    if args.action != "reload" and not args.name:
        raise UsageError(f"ctl {args.action} needs a dataset name")
    if args.action == "reload" and args.name:
        raise UsageError("ctl reload takes no dataset name")
    req: dict[str, Any] = {"op": args.action}
    if args.name:
        req["name"] = args.name
    reply = request(socket_path(args.socket), req)
    if args.json:
        json.dump(reply, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(reply.get("message", "ok"))
    return 0
