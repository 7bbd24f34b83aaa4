"""Where keepalive keeps its files — the one module that knows locations.

Everything keepalive persists lives outside scratch:

* profiles: ``$XDG_CONFIG_HOME/scratchfs/keepalive.toml`` (default ``~/.config``);
* per-profile state: ``$XDG_STATE_HOME/scratchfs/keepalive/<profile>/`` (default
  ``~/.local/state``), unless the profile sets ``state_dir``:

  - ``registry.json`` and ``registry.lock`` — the registered datasets;
  - ``datasets/<name>/`` — ``plan``, ``journal`` (the checkpoint), ``lock`` (held by a running
    refresh), ``last_run.json``;
  - ``logs/`` (or the profile's ``log_dir``) — one log file per refresh run.

Loaders built on these locations (import them from their modules):

* ``scratchfs.keepalive.profiles.load_profile(name=None) -> (name, Profile)`` — the named or
  default profile, built-in or from the config file;
* ``scratchfs.keepalive.registry.load_registry(profile_name, profile) -> Registry``;
* ``scratchfs.keepalive.registry.update_registry(profile_name, profile)`` — a context manager
  giving the registry under its lock and saving it atomically on clean exit.

Every function here reads the environment when called, so tests can point ``XDG_CONFIG_HOME``
and ``XDG_STATE_HOME`` at temporary directories.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from .profiles import Profile

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str = "name") -> str:
    """Validate a profile or dataset name (it becomes a directory name): return it or raise."""
    if not _NAME_RE.fullmatch(name or ""):
        raise UsageError(f"bad {what} {name!r}: use letters, digits, '.', '_' or '-' (max 64, not starting with '.')")
    return name


def config_home() -> Path:
    """``$XDG_CONFIG_HOME`` or ``~/.config``."""
    v = os.environ.get("XDG_CONFIG_HOME")
    return Path(v) if v and os.path.isabs(v) else Path.home() / ".config"


def state_home() -> Path:
    """``$XDG_STATE_HOME`` or ``~/.local/state``."""
    v = os.environ.get("XDG_STATE_HOME")
    return Path(v) if v and os.path.isabs(v) else Path.home() / ".local" / "state"


def config_file() -> Path:
    """The TOML file holding user profiles and the default profile name."""
    return config_home() / "scratchfs" / "keepalive.toml"


def keepalive_state_root() -> Path:
    """Parent of the default per-profile state directories."""
    return state_home() / "scratchfs" / "keepalive"


def _expand(p: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(p)))


def state_dir(profile_name: str, profile: Profile | None = None) -> Path:
    """State directory of a profile: its ``state_dir`` setting or the XDG default."""
    if profile is not None and profile.state_dir:
        return _expand(profile.state_dir)
    return keepalive_state_root() / check_name(profile_name, "profile name")


def log_dir(profile_name: str, profile: Profile | None = None) -> Path:
    """Directory of per-run log files: the profile's ``log_dir`` or ``<state_dir>/logs``."""
    if profile is not None and profile.log_dir:
        return _expand(profile.log_dir)
    return state_dir(profile_name, profile) / "logs"


def registry_path(profile_name: str, profile: Profile | None = None) -> Path:
    return state_dir(profile_name, profile) / "registry.json"


def registry_lock_path(profile_name: str, profile: Profile | None = None) -> Path:
    return state_dir(profile_name, profile) / "registry.lock"


def datasets_dir(profile_name: str, profile: Profile | None = None) -> Path:
    return state_dir(profile_name, profile) / "datasets"


def dataset_dir(profile_name: str, dataset: str, profile: Profile | None = None) -> Path:
    """Checkpoint, lock and last-run record of one dataset."""
    return datasets_dir(profile_name, profile) / check_name(dataset, "dataset name")


def dataset_lock_path(profile_name: str, dataset: str, profile: Profile | None = None) -> Path:
    """Lock held (flock) by a running refresh of *dataset*."""
    return dataset_dir(profile_name, dataset, profile) / "lock"
