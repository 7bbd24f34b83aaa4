"""Status of registered datasets, from the registry, last-run records and checkpoints (no scan)."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from ..locking import is_locked, read_owner
from . import checkpoint as ck
from . import paths
from .forecast import DAY
from .profiles import Profile
from .refresh import read_last_run
from .registry import DatasetEntry, is_expired


def protected_until(profile: Profile, last_run: dict[str, Any] | None) -> str | None:
    """Pure: date until which the last complete refresh keeps files off the purge list."""
    lc = (last_run or {}).get("last_complete")
    if not isinstance(lc, dict) or not lc.get("plan_created"):
        return None
    t = float(lc["plan_created"]) + profile.rule.age_days * DAY
    return dt.datetime.fromtimestamp(t).date().isoformat()


def dataset_status(profile_name: str, profile: Profile, entry: DatasetEntry, today: dt.date) -> dict[str, Any]:
    ddir = paths.dataset_dir(profile_name, entry.name, profile)
    lock_p = paths.dataset_lock_path(profile_name, entry.name, profile)
    last = read_last_run(profile_name, entry.name, profile)
    health = ck.inspect_checkpoint(ddir)
    running = is_locked(lock_p)
    owner = read_owner(lock_p) if running else None
    if not entry.enabled:
        state = "disabled"
    elif is_expired(entry, today):
        state = "expired"
    elif not os.path.lexists(entry.path):
        state = "missing"
    elif running:
        state = "running"
    elif health.present:
        state = "interrupted"
    elif last and last.get("status") == "partial":
        state = "partial"
    elif last and last.get("status") in ("complete",):
        state = "ok"
    else:
        state = "never refreshed"
    out: dict[str, Any] = {
        "name": entry.name,
        "path": entry.path,
        "kind": entry.kind,
        "keep_until": entry.keep_until,
        "days_left": (entry.keep_until_date() - today).days,
        "enabled": entry.enabled,
        "note": entry.note,
        "state": state,
        "refresh_permitted": not profile.refusal(),
        "protected_until": protected_until(profile, last),
        "running_pid": owner.pid if owner else None,
        "checkpoint": {"present": health.present, "ok": health.ok, "message": health.message,
                       "units": health.units, "units_done": health.done},
        "last_run": None,
    }
    if last:
        out["last_run"] = {k: last.get(k) for k in ("status", "started", "finished", "refreshed", "errors",
                                                    "error_sample", "entries_total", "units_total", "log")}
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = [f"{s['name']}: {s['state']}  ({s['kind']} {s['path']})",
             f"  keep until {s['keep_until']} ({s['days_left']} days)"
             + (f"; protected until {s['protected_until']}" if s["protected_until"] else "")]
    if s["note"]:
        lines.append(f"  note: {s['note']}")
    if s["running_pid"]:
        lines.append(f"  refresh running (pid {s['running_pid']})")
    if s["checkpoint"]["present"]:
        lines.append(f"  checkpoint: {s['checkpoint']['message']}")
    lr = s["last_run"]
    if lr:
        when = dt.datetime.fromtimestamp(lr["finished"] or lr["started"] or 0).strftime("%Y-%m-%d %H:%M")
        lines.append(f"  last run {when}: {lr['status']}, {lr['refreshed'] or 0:,} refreshed, {lr['errors'] or 0:,} errors")
        for e in (lr.get("error_sample") or [])[:10]:
            lines.append(f"    {e}")
    if not s["refresh_permitted"]:
        lines.append("  refresh not permitted on this profile")
    return "\n".join(lines)
