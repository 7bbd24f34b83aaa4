"""The control requests mountd serves on its socket, and its status document.

``status`` is for everyone; ``pin``, ``unpin``, ``prefetch``, ``evict`` and ``reload`` only for
root or the control group (checked with the peer's kernel credentials, see control.py).
Runs on the trio thread, between the daemon's other tasks.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from scratchfs.errors import NotFoundError, PermissionRefused, ScratchfsError, UsageError
from scratchfs.stats import CACHE, SCRATCH

from .control import Peer, is_privileged

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

ACTIONS = ("pin", "unpin", "prefetch", "evict", "reload")


async def handle_request(d: Daemon, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
    op = req.get("op")
    try:
        if op == "status":
            return {"ok": True, "status": status(d)}
        if op not in ACTIONS:
            raise UsageError(f"unknown request {op!r}")
        if not is_privileged(peer, d.s.control_gid):
            raise PermissionRefused(f"{op}: permission denied (root or the mountd control group only)")
        if op == "reload":
            await d.reload()
            return {"ok": True, "message": "configuration reloaded"}
        name = req.get("name")
        if not isinstance(name, str):
            raise UsageError(f"{op} needs a dataset name")
        message = await control(d, op, name)
        log.info("control: %s %s by uid %d: %s", op, name, peer.uid, message)
        return {"ok": True, "message": message}
    except ScratchfsError as e:
        return {"ok": False, "error": str(e), "code": e.exit_code}
    except Exception as e:  # a bug must not kill the daemon
        log.exception("control request %r failed", op)
        return {"ok": False, "error": f"internal error: {e}", "code": 1}

async def control(d: Daemon, op: str, name: str) -> str:
    m = d.managed.get(name)
    if m is None:
        raise NotFoundError(f"no dataset {name!r}")
    if op == "pin":
        d.ctl_pins.add(name)
        d.ctl_unpins.discard(name)
        d.wake_policy()
        return f"{name} pinned"
    if op == "unpin":
        d.ctl_pins.discard(name)
        if name in d.s.pinned:
            d.ctl_unpins.add(name)
        d.wake_policy()
        return f"{name} unpinned"
    if op == "prefetch":
        if name in d.s.never_cache:
            raise UsageError(f"{name} is in never_cache")
        if m.cache_file is not None:
            return f"{name} is cached already"
        if m.job is not None or m.adopting:
            return f"{name} is being copied already"
        if m.backing_gone:
            raise NotFoundError(f"{name}: backing image is gone")
        if d.has_kept_copy(name) and await d.revive(m):
            return f"{name} served from its kept copy again"
        m.retry_at = 0.0
        m.prefetch = True
        d.start_copy(m, why="prefetch")
        return f"copying {name}"
    # evict
    if name in d.pins():
        raise UsageError(f"{name} is pinned; unpin it first")
    d.evicted_at[name] = trio.current_time()  # not promoted again by the policy for a window
    m.prefetch = False
    if m.job is not None:
        m.job.keep_partial = False
        m.job.cancel.set()
        return f"copy of {name} cancelled"
    if m.cache_file is None:
        if name in d.reclaimable:
            d.drop_reclaimable(name)
            return f"kept copy of {name} deleted"
        return f"{name} is not cached"
    if m.backing_gone:
        d.ns.remove(name)
        del d.managed[name]
        d.retire(m.ds, [m.cache_file])
        return f"{name} removed (its backing image is gone)"
    if not await d.demote(m, why="evict", keep=False):
        raise ScratchfsError(f"could not demote {name} (see the daemon log)")
    return f"{name} demoted"

def status(d: Daemon) -> dict[str, Any]:
    now = trio.current_time()
    snap = d.stats.snapshot(now)
    pins = d.pins()
    out = []
    used = 0
    for name in sorted(d.managed):
        m = d.managed[name]
        ds = snap.datasets.get(name)
        scratch_b = ds.tier_total(SCRATCH) if ds else 0
        cache_b = ds.tier_total(CACHE) if ds else 0
        if m.cache_file is not None or m.job is not None:
            used += m.size
        out.append({
            "name": name,
            "tier": m.ds.tier,
            "size": m.size,
            "backing": str(m.backing) if m.backing else None,
            "backing_gone": m.backing_gone,
            "cache_file": str(d.s.cachedir / m.cache_file) if m.cache_file else None,
            "kept_copy": str(d.s.cachedir / r.file) if (r := d.reclaimable.get(name)) and not r.partial else None,
            # a cancelled copy's temp file, to go on from: {"file", "bytes_done"}
            "partial_copy": {"file": str(d.s.cachedir / r.file), "bytes_done": r.stat[0]} if r and r.partial else None,
            "rate": ds.rate if ds else 0.0,
            "bytes_scratch": scratch_b,
            "bytes_cache": cache_b,
            "bytes_copied": m.copied,
            "copied_back": m.recopied,  # copies soon after a demotion by the policy (policy input)
            "hit_ratio": ds.hit_ratio if ds else None,
            "pinned": name in pins,
            "never_cache": name in d.s.never_cache,
            "last_promotion": m.last_promotion,
            "last_demotion": m.last_demotion,
            "copy": dict(m.job.progress.as_dict(), why=m.job.why) if m.job else None,
            "copy_failures": m.failures,
            "last_error": m.last_error,
            "adopting": m.adopting,
        })  # fmt: skip
    return {
        "pid": os.getpid(),
        "mountdir": str(d.s.mountdir),
        "cachedir": str(d.s.cachedir),
        "started": d.started_wall,
        "window": d.s.window,
        "live": d.live,
        "cache": {
            "capacity": d.capacity_now,
            "free": d.free_now,
            "budget": d.last_decision.budget if d.last_decision else None,
            "used": used,
            "reclaimable": d.reclaimable_bytes(),
        },
        "datasets": out,
        "refused": [{"name": n, "images": [str(p) for p in ps]} for n, ps in sorted(d.clashes.items())],
    }
