"""doctor and repair: health checks of profile, roots, registry, checkpoints and locks.

Other keepalive parts contribute findings through :class:`Finding`. The scheduling commands
hook in with ``schedule_cli.doctor_findings(profile_name, profile, state_dir) -> list[Finding]``
(plain dicts with the same keys are accepted too): doctor includes them in its report and its
exit status. Severities: ``ok``, ``info`` (nothing to do), ``warning`` and ``error`` (action
needed: doctor exits 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
