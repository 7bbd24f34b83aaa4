"""The registry: datasets kept alive under one profile, with their keep-until dates.

Stored as ``registry.json`` in the profile's state directory, always written through
``scratchfs.state`` (atomic replace) while holding ``registry.lock``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, PermissionRefused, UsageError
from ..locking import Lock
from ..state import atomic_write_json
from . import paths
from .profiles import Profile

log = logging.getLogger(__name__)

REGISTRY_VERSION = 1
SQUASHFS_MAGIC = b"hsqs"


@dataclass
class DatasetEntry:
    name: str
    path: str
    kind: str  # "tree" or "image"
    keep_until: str  # ISO date, inclusive
    enabled: bool = True
    added: float = 0.0
    note: str = ""

    def keep_until_date(self) -> dt.date:
        return dt.date.fromisoformat(self.keep_until)


def is_expired(entry: DatasetEntry, today: dt.date) -> bool:
    """Pure: a dataset is expired the day after its keep-until date."""
    return today > entry.keep_until_date()


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


@dataclass
class Registry:
    profile: str
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)

    def get(self, name: str) -> DatasetEntry:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none registered"
            raise NotFoundError(f"no dataset {name!r} in profile {self.profile!r} ({known})") from None

    def to_json(self) -> dict[str, Any]:
        return {"version": REGISTRY_VERSION, "profile": self.profile,
                "datasets": {n: asdict(e) for n, e in sorted(self.datasets.items())}}


def _parse(profile_name: str, path: Path, raw: Any) -> Registry:
    if not isinstance(raw, dict) or raw.get("version") != REGISTRY_VERSION or not isinstance(raw.get("datasets"), dict):
        raise ValueError("unexpected layout or version")
    reg = Registry(profile_name)
    for name, d in raw["datasets"].items():
        fields = {k: d[k] for k in DatasetEntry.__dataclass_fields__ if k in d}
        reg.datasets[name] = DatasetEntry(**fields)
        reg.datasets[name].keep_until_date()
    return reg


def load_registry(profile_name: str, profile: Profile | None = None) -> Registry:
    """The profile's registry (empty when none exists yet).

    A registry that cannot be parsed raises UsageError naming the file: it holds the user's
    intent and is never silently replaced.
    """
    path = paths.registry_path(profile_name, profile)
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return Registry(profile_name)
    except (OSError, ValueError) as e:
        raise UsageError(f"registry {path} is unreadable ({e}); fix or move it away") from None
    try:
        return _parse(profile_name, path, raw)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"registry {path} is damaged ({e}); fix or move it away") from None


def save_registry(reg: Registry, profile: Profile | None = None) -> None:
    atomic_write_json(paths.registry_path(reg.profile, profile), reg.to_json())


@contextlib.contextmanager
def update_registry(profile_name: str, profile: Profile | None = None, wait: float = 10.0) -> Iterator[Registry]:
    """Load the registry under its lock, yield it, save it atomically on clean exit."""
    lock = Lock(paths.registry_lock_path(profile_name, profile), what=f"registry of profile {profile_name}")
    lock.acquire(wait=wait, poll=0.05)
    try:
        reg = load_registry(profile_name, profile)
        yield reg
        save_registry(reg, profile)
    finally:
        lock.release()


def within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_allowed(path: Path, profile: Profile) -> Path:
    """Resolve *path* and require it inside one of the profile's allowed roots; return it."""
    real = Path(os.path.realpath(path))
    roots = profile.expanded_roots()
    if not any(within(real, r) for r in roots):
        shown = ", ".join(map(str, roots)) or ", ".join(profile.roots) or "none configured"
        extra = f" (resolves to {real})" if str(real) != os.path.abspath(path) else ""
        raise PermissionRefused(f"{path}{extra} is outside the allowed roots of profile {profile.name!r}: {shown}")
    return real


def _read_magic(path: Path) -> bytes:
    """First 4 bytes, read with O_NOATIME where allowed: looking must not count as access."""
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, os.O_RDONLY | noatime)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4)
    finally:
        os.close(fd)


def classify(path: Path) -> str:
    """'tree' for a directory, 'image' for a squashfs file; anything else is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"no such path: {path}") from None
    import stat as stat_mod

    if stat_mod.S_ISDIR(st.st_mode):
        return "tree"
    if stat_mod.S_ISREG(st.st_mode):
        if _read_magic(path) == SQUASHFS_MAGIC:
            return "image"
        raise UsageError(f"{path} is neither a directory nor a squashfs image")
    raise UsageError(f"{path} is neither a directory nor a squashfs image")


def make_entry(name: str, path: str, keep_until: str, profile: Profile, now: float) -> DatasetEntry:
    """Validate a new dataset: name, date, path inside the allowed roots (no escapes)."""
    paths.check_name(name, "dataset name")
    parse_date(keep_until)
    raw = Path(os.path.abspath(os.path.expanduser(path)))
    if ".." in Path(path).parts:
        raise PermissionRefused(f"{path}: '..' is not allowed in dataset paths")
    if not os.path.lexists(raw):
        raise NotFoundError(f"no such path: {path}")
    real = check_allowed(raw, profile)
    kind = classify(real)
    return DatasetEntry(name=name, path=str(real), kind=kind, keep_until=keep_until, enabled=True, added=now)
