"""Optional hooks into the scheduling commands (``schedule_cli``), when that module exists.

``schedule_cli`` may define:

* ``register_keepalive(subparsers)`` — add its verbs to the keepalive command group;
* ``doctor_findings(profile_name, profile, state_dir) -> list[Finding | dict]``;
* ``refresh_scheduled(profile_name, profile, state_dir) -> bool`` — is ``refresh --all`` of this
  profile scheduled (used by forecast warnings and status).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from . import paths
from .profiles import Profile

log = logging.getLogger(__name__)


def schedule_cli() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__package__}.schedule_cli")
    except ImportError:
        return None


def refresh_scheduled(profile_name: str, profile: Profile) -> bool | None:
    """True/False from the scheduling commands; None when they cannot tell."""
    fn = getattr(schedule_cli(), "refresh_scheduled", None)
    if fn is None:
        return None
    try:
        return bool(fn(profile_name, profile, paths.state_dir(profile_name, profile)))
    except Exception as e:  # a broken hook must not break forecast or status
        log.warning("cannot tell whether refreshes are scheduled: %s", e)
        log.debug("refresh_scheduled failed", exc_info=True)
        return None


def schedule_findings(profile_name: str, profile: Profile) -> list[Any]:
    fn = getattr(schedule_cli(), "doctor_findings", None)
    if fn is None:
        return []
    return list(fn(profile_name, profile, paths.state_dir(profile_name, profile)) or [])
