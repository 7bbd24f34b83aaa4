"""doctor and repair: health checks of profile, roots, registry, checkpoints and locks.

Other keepalive parts contribute findings through :class:`Finding`. The scheduling commands
hook in with ``schedule_cli.doctor_findings(profile_name, profile, state_dir) -> list[Finding]``
(plain dicts with the same keys are accepted too): doctor includes them in its report and its
exit status. Severities: ``ok``, ``info`` (nothing to do), ``warning`` and ``error`` (action
needed: doctor exits 1).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ScratchfsError
from ..locking import Lock, is_locked, read_owner
from . import checkpoint as ck
from . import hooks, paths
from .profiles import Profile, load_profile
from .refresh import read_last_run
from .registry import DatasetEntry, load_registry, update_registry, within

log = logging.getLogger(__name__)

SEVERITIES = ("ok", "info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One doctor result. ``fix`` says what ``repair`` would do (empty: nothing automatic)."""

    severity: str
    message: str
    dataset: str | None = None
    check: str = ""
    fix: str = ""

    def needs_action(self) -> bool:
        return self.severity in ("warning", "error")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, obj: Any, check: str = "") -> Finding:
        """Accept a Finding, a dict or any object with ``severity`` and ``message``."""
        if isinstance(obj, Finding):
            return obj
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        sev = str(get("severity", "warning"))
        return cls(
            severity=sev if sev in SEVERITIES else "warning",
            message=str(get("message", obj)),
            dataset=get("dataset", None),
            check=str(get("check", "") or check),
            fix=str(get("fix", "") or ""),
        )


# -- checks ---------------------------------------------------------------------------------------

def _datasets_on_disk(profile_name: str, profile: Profile) -> list[str]:
    d = paths.datasets_dir(profile_name, profile)
    try:
        return sorted(p.name for p in d.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _stale_lock(lock_p: Path) -> bool:
    try:
        return lock_p.stat().st_size > 0 and not is_locked(lock_p)
    except FileNotFoundError:
        return False


def run_doctor(profile_name: str | None, today: dt.date) -> tuple[str | None, list[Finding]]:
    """All findings for one profile (the default when *profile_name* is None)."""
    out: list[Finding] = []
    try:
        name, profile = load_profile(profile_name)
    except ScratchfsError as e:
        return profile_name, [Finding("error", str(e), check="profile")]
    refusal = profile.refusal()
    out.append(Finding("ok", f"profile {name}: purge rule {profile.rule.describe()}", check="profile"))
    try:
        reg = load_registry(name, profile)
    except ScratchfsError as e:
        out.append(Finding("error", str(e), check="registry"))
        reg = None
    n = len(reg.datasets) if reg else 0
    if refusal:
        out.append(Finding("warning" if n else "info", f"{refusal}" + (f" ({n} dataset(s) registered)" if n else ""),
                           check="refresh-permitted"))
    roots = profile.expanded_roots()
    existing = [r for r in roots if r.is_dir()]
    if not existing:
        out.append(Finding("warning", f"no allowed root of profile {name} exists: "
                           f"{', '.join(map(str, roots)) or ', '.join(profile.roots) or 'none configured'}", check="roots"))
    else:
        out.append(Finding("ok", f"allowed roots: {', '.join(map(str, existing))}", check="roots"))
    cadence = profile.scheduler.cadence_days
    if reg is not None:
        out.append(Finding("ok", f"registry: {n} dataset(s)", check="registry"))
        for entry in reg.datasets.values():
            out.extend(_dataset_findings(name, profile, entry, today, cadence))
    for dname in _datasets_on_disk(name, profile):
        ddir = paths.dataset_dir(name, dname, profile)
        lock_p = paths.dataset_lock_path(name, dname, profile)
        if reg is not None and dname not in reg.datasets:
            out.append(Finding("warning", f"state of an unregistered dataset: {ddir}", dname, "orphan",
                               "delete the orphaned checkpoint and records"))
        if _stale_lock(lock_p):
            owner = read_owner(lock_p)
            who = f" of pid {owner.pid} on {owner.host}" if owner else ""
            out.append(Finding("warning", f"stale lock{who} (process gone): {lock_p}", dname, "lock",
                               "clear the stale lock"))
    try:
        extra = hooks.schedule_findings(name, profile)
    except Exception as e:  # the scheduling checks must not hide the others
        log.debug("schedule doctor hook failed", exc_info=True)
        extra = [Finding("warning", f"scheduling checks failed: {e}", check="schedule")]
    out.extend(Finding.coerce(f, "schedule") for f in extra)
    return name, out


def _dataset_findings(name: str, profile: Profile, e: DatasetEntry, today: dt.date, cadence: float) -> list[Finding]:
    out: list[Finding] = []
    days = (e.keep_until_date() - today).days
    if not e.enabled:
        out.append(Finding("info", f"disabled{': ' + e.note if e.note else ''}", e.name, "dataset"))
    elif not os.path.lexists(e.path):
        out.append(Finding("warning", f"path vanished: {e.path}", e.name, "path", "disable it with a note"))
    else:
        real = os.path.realpath(e.path)
        if real != e.path or not any(within(Path(real), r) for r in profile.expanded_roots()):
            out.append(Finding("error", f"{e.path} now resolves to {real}, outside the registered place or the "
                               "allowed roots; refresh will refuse it", e.name, "path"))
        if days < 0:
            out.append(Finding("info", f"expired on {e.keep_until}: no longer refreshed", e.name, "keep-until"))
        elif days <= cadence:
            out.append(Finding("warning", f"keep-until {e.keep_until} is in {days} day(s): extend it or let it expire",
                               e.name, "keep-until"))
        last = read_last_run(name, e.name, profile)
        if last and last.get("status") == "partial":
            out.append(Finding("warning", f"last refresh partial: {last.get('errors', 0)} error(s), e.g. "
                               + "; ".join((last.get("error_sample") or [])[:3]), e.name, "last-run"))
    health = ck.inspect_checkpoint(paths.dataset_dir(name, e.name, profile))
    if health.present and not health.ok:
        out.append(Finding("warning", f"damaged checkpoint: {health.message}", e.name, "checkpoint",
                           "delete the damaged checkpoint"))
    elif health.present and not is_locked(paths.dataset_lock_path(name, e.name, profile)):
        out.append(Finding("info", f"interrupted refresh ({health.message}); the next refresh resumes it",
                           e.name, "checkpoint"))
    return out


def run_repair(profile_name: str | None, today: dt.date) -> tuple[list[str], list[Finding]]:
    """Fix what can be fixed safely; return (actions taken, findings after repair)."""
    name, findings = run_doctor(profile_name, today)
    actions: list[str] = []
    if name is None:
        return actions, findings
    _, profile = load_profile(name)
    for f in findings:
        if not f.fix or not f.dataset:
            continue
        lock_p = paths.dataset_lock_path(name, f.dataset, profile)
        ddir = paths.dataset_dir(name, f.dataset, profile)
        try:
            if f.check == "lock":
                with Lock(lock_p, what=f"refresh of {f.dataset}"):
                    pass  # taking and releasing the lock clears the dead owner's record
                actions.append(f"{f.dataset}: cleared stale lock {lock_p}")
            elif f.check == "checkpoint":
                with Lock(lock_p, what=f"refresh of {f.dataset}"):
                    ck.remove_checkpoint(ddir)
                actions.append(f"{f.dataset}: deleted damaged checkpoint in {ddir}")
            elif f.check == "orphan":
                with Lock(lock_p, what=f"refresh of {f.dataset}"):
                    for child in ddir.iterdir():
                        if child.name != "lock":
                            child.unlink()
                    lock_p.unlink()
                ddir.rmdir()
                actions.append(f"{f.dataset}: deleted orphaned state {ddir}")
            elif f.check == "path":
                with update_registry(name, profile) as reg:
                    entry = reg.datasets.get(f.dataset)
                    if entry is not None and not os.path.lexists(entry.path):
                        entry.enabled = False
                        entry.note = f"path vanished; disabled by repair on {today.isoformat()}"
                actions.append(f"{f.dataset}: path vanished, disabled with a note")
        except (ScratchfsError, OSError) as e:
            actions.append(f"{f.dataset}: could not {f.fix}: {e}")
    if any(f.check == "schedule" and f.fix for f in findings):
        from . import schedule

        try:
            actions += schedule.repair(name, profile, paths.state_dir(name, profile))
        except (ScratchfsError, OSError) as e:
            actions.append(f"schedule: could not repair: {e}")
    if actions:
        _, findings = run_doctor(name, today)
    return actions, findings
