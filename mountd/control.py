"""The control socket: one JSON request line in, one JSON reply line out.

Anyone may connect (the socket is mode 0666) and ask for ``status``; requests that change
something are served only for root or members of the configured group, as the kernel reports
the peer (SO_PEERCRED, and the peer's supplementary groups from /proc). Everyone else gets a
clear permission error. The client side is :mod:`scratchfs.status_cmd`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        out = {self.gid}
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        out |= {int(g) for g in line.split()[1:]}
                        break
        return out


def is_privileged(peer: Peer, group_gid: int | None) -> bool:
    if peer.uid == 0:
        return True
    return group_gid is not None and group_gid in peer.groups()


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


def _peer_of(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another daemon is listening there")


class ControlServer:
    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(self.path))
            os.chmod(self.path, 0o666)  # status is for everyone; changes are checked per request
            sock.listen(64)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve_one, conn)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve_one(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                peer = _peer_of(conn)
                buf = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    while b"\n" not in buf and len(buf) < MAX_REQUEST:
                        data = await conn.recv(65536)
                        if not data:
                            break
                        buf += data
                try:
                    req = json.loads(buf.split(b"\n", 1)[0])
                    if not isinstance(req, dict):
                        raise ValueError("not an object")
                except ValueError:
                    reply: dict[str, Any] = {"ok": False, "error": "bad request (one JSON object per line)", "code": 2}
                else:
                    reply = await self.handler(req, peer)
                out = (json.dumps(reply, sort_keys=True) + "\n").encode()
                while out:
                    n = await conn.send(out)
                    out = out[n:]
            except OSError as e:
                log.debug("control connection failed: %s", e)
