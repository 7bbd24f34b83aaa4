"""Site profiles: allowed scratch roots, the purge rule, whether refreshing is permitted.

Built-in profiles describe known sites; user profiles live in the TOML config file (see
``paths.config_file``) under ``[profiles.<name>]`` and override built-in fields of the same
name. ``default_profile`` in that file names the profile used when ``--profile`` is not given.
"""

from __future__ import annotations

import getpass
import glob
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, UsageError
from ..state import atomic_write
from . import paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older interpreters only
    import tomli as tomllib

log = logging.getLogger(__name__)

TIMESTAMPS = ("atime", "ctime", "mtime")


@dataclass(frozen=True)
class PurgeRule:
    """When the site purges a file.

    ``combine == "all"``: a file is a candidate when *every* listed timestamp is older than
    ``age_days`` (Alliance: atime and ctime); ``"any"``: when at least one is. ``stated`` is
    False when the rule is an assumption (``generic``): forecasts then say so and refresh is
    refused until the user states the site's rule.
    """

    timestamps: tuple[str, ...] = ("atime",)
    combine: str = "all"
    age_days: float = 30.0
    stated: bool = True

    def __post_init__(self) -> None:
        if not self.timestamps or any(t not in TIMESTAMPS for t in self.timestamps):
            raise UsageError(f"purge timestamps must be among {', '.join(TIMESTAMPS)}: {','.join(self.timestamps)}")
        if self.combine not in ("all", "any"):
            raise UsageError(f"purge combine must be 'all' or 'any', not {self.combine!r}")
        if not self.age_days > 0:
            raise UsageError(f"purge age must be positive: {self.age_days}")

    def describe(self) -> str:
        stamps = f" {'and' if self.combine == 'all' else 'or'} ".join(self.timestamps)
        s = f"{stamps} older than {self.age_days:g} days"
        return s if self.stated else s + " (assumed; the site's rule is not stated)"


@dataclass(frozen=True)
class SchedulerDefaults:
    """Defaults for scheduled refreshes (used by the scheduling commands)."""

    account: str = ""
    partition: str = ""
    cpus: int = 1
    mem: str = "2G"
    time_limit: str = "04:00:00"
    cadence_days: float = 14.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    roots: tuple[str, ...] = ()
    rule: PurgeRule = field(default_factory=PurgeRule)
    refresh_permitted: bool = True
    refusal_reason: str = ""
    candidate_list: str = ""
    state_dir: str = ""
    log_dir: str = ""
    workers: int = 4
    unit_size: int = 2000
    max_rate: float = 0.0  # entries refreshed per second at most (0: unlimited), for shared metadata servers
    scheduler: SchedulerDefaults = field(default_factory=SchedulerDefaults)
    builtin: bool = False

    def expanded_roots(self) -> list[Path]:
        """Allowed roots with ``$USER``/``$HOME``/``~`` and globs expanded, resolved."""
        out: list[Path] = []
        for r in self.roots:
            p = expand_user_path(r)
            matches = glob.glob(p) if glob.has_magic(p) else [p]
            for m in sorted(matches):
                rp = Path(os.path.realpath(m))
                if rp not in out:
                    out.append(rp)
        return out

    def candidate_list_path(self) -> Path | None:
        return Path(expand_user_path(self.candidate_list)) if self.candidate_list else None

    def refusal(self) -> str:
        """Why refresh is refused here, with what to do instead ('' when permitted)."""
        if self.refresh_permitted and self.rule.stated:
            return ""
        if not self.rule.stated:
            return (f"profile {self.name!r} is forecast-only until the site's purge rule is stated: "
                    f"scratch-keepalive init --profile {self.name} --purge-on atime --purge-age 30d")
        why = self.refusal_reason or "the site forbids modifying access times to avoid the purge"
        return (f"refresh refused on profile {self.name!r}: {why}; archive the dataset or pack it into a "
                "squashfs image kept on persistent storage (project/work space)")


def expand_user_path(p: str) -> str:
    env = dict(os.environ)
    env.setdefault("USER", getpass.getuser())
    out = os.path.expanduser(p)
    for k in sorted(env, key=len, reverse=True):
        out = out.replace("${" + k + "}", env[k]).replace("$" + k, env[k])
    return out


BUILTIN: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="br200",
            description="Indiana University Big Red 200 / Slate-Scratch: files not accessed for 30 days are purged",
            roots=("/N/scratch/$USER",),
            rule=PurgeRule(("atime",), "all", 30.0),
        ),
        Profile(
            name="alliance",
            description="Digital Research Alliance of Canada: purged when both atime and ctime are older than 60 days",
            roots=("/scratch/$USER", "/home/$USER/scratch"),
            rule=PurgeRule(("atime", "ctime"), "all", 60.0),
            candidate_list="/scratch/to_delete/$USER",
        ),
        Profile(
            name="nersc",
            description="NERSC Perlmutter scratch: files not accessed for 8 weeks are purged",
            roots=("/pscratch/sd/?/$USER",),
            rule=PurgeRule(("atime",), "all", 56.0),
        ),
        Profile(
            name="tacc",
            description="TACC scratch: files not accessed for 10 days may be purged",
            roots=("/scratch/*/$USER",),
            rule=PurgeRule(("atime",), "all", 10.0),
            refresh_permitted=False,
            refusal_reason="TACC prohibits deliberately modifying access times to dodge the purge",
        ),
        Profile(
            name="generic",
            description="Unknown site: forecast only until the purge rule is stated",
            roots=("$SCRATCH", "/scratch/$USER"),
            rule=PurgeRule(("atime",), "all", 30.0, stated=False),
        ),
    )
}


# -- TOML config -------------------------------------------------------------------------------

def read_config() -> dict[str, Any]:
    """The parsed config file ({} when absent); a broken file is a one-line UsageError."""
    path = paths.config_file()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_table(prefix: str, d: Mapping[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in d.items() if isinstance(v, Mapping)}
    if prefix and (scalars or not tables):
        lines.append(f"\n[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in tables.items():
        _toml_table(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v, lines)


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def write_config(cfg: Mapping[str, Any]) -> None:
    lines = ["# scratch-keepalive profiles (written by `scratch-keepalive init`)"]
    _toml_table("", cfg, lines)
    atomic_write(paths.config_file(), "\n".join(lines) + "\n")


def profile_to_dict(p: Profile) -> dict[str, Any]:
    d = asdict(p)
    for k in ("name", "builtin"):
        d.pop(k)
    rule = d.pop("rule")
    d["purge_timestamps"] = list(rule["timestamps"])
    d["purge_combine"] = rule["combine"]
    d["purge_age_days"] = rule["age_days"]
    d["purge_rule_stated"] = rule["stated"]
    d["roots"] = list(d["roots"])
    return d


def profile_from_dict(name: str, d: Mapping[str, Any], base: Profile | None = None) -> Profile:
    """Build a profile from a config table, on top of *base* (a built-in of the same name)."""
    p = base or Profile(name=name)
    try:
        rule = p.rule
        if any(k in d for k in ("purge_timestamps", "purge_combine", "purge_age_days", "purge_rule_stated")):
            rule = PurgeRule(
                tuple(d.get("purge_timestamps", rule.timestamps)),
                str(d.get("purge_combine", rule.combine)),
                float(d.get("purge_age_days", rule.age_days)),
                bool(d.get("purge_rule_stated", True)),
            )
        sched = p.scheduler
        if isinstance(d.get("scheduler"), Mapping):
            s = d["scheduler"]
            sched = replace(
                sched,
                **{k: type(getattr(sched, k))(s[k]) for k in s if k in SchedulerDefaults.__dataclass_fields__},
            )
        simple: dict[str, Any] = {}
        for k in ("description", "refusal_reason", "candidate_list", "state_dir", "log_dir"):
            if k in d:
                simple[k] = str(d[k])
        for k in ("workers", "unit_size"):
            if k in d:
                simple[k] = int(d[k])
                if simple[k] < 1:
                    raise ValueError(f"{k} must be at least 1")
        if "max_rate" in d:
            simple["max_rate"] = float(d["max_rate"])
            if simple["max_rate"] < 0:
                raise ValueError("max_rate must not be negative")
        if "refresh_permitted" in d:
            simple["refresh_permitted"] = bool(d["refresh_permitted"])
        if "roots" in d:
            roots = d["roots"]
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise ValueError("roots must be a list of paths")
            simple["roots"] = tuple(roots)
        return replace(p, name=name, rule=rule, scheduler=sched, **simple)
    except (TypeError, ValueError) as e:
        raise UsageError(f"profile {name!r} in {paths.config_file()}: {e}") from None


def available_profiles() -> dict[str, Profile]:
    cfg = read_config()
    out = dict(BUILTIN)
    for name, table in (cfg.get("profiles") or {}).items():
        if isinstance(table, Mapping):
            out[name] = profile_from_dict(name, table, BUILTIN.get(name))
    return out


def default_profile_name() -> str | None:
    v = read_config().get("default_profile")
    return str(v) if v else None


def load_profile(name: str | None = None) -> tuple[str, Profile]:
    """The profile *name* (or the configured default) → ``(name, Profile)``.

    Raises UsageError when no profile is given and none is configured, NotFoundError when the
    name is unknown.
    """
    if name is None:
        name = os.environ.get("SCRATCH_KEEPALIVE_PROFILE") or default_profile_name()
        if not name:
            raise UsageError("no profile: run `scratch-keepalive init --profile NAME` or pass --profile")
    paths.check_name(name, "profile name")
    profiles = available_profiles()
    if name not in profiles:
        raise NotFoundError(f"unknown profile {name!r} (known: {', '.join(sorted(profiles))}; "
                            f"create it with `scratch-keepalive init --profile {name} --root DIR`)")
    return name, profiles[name]


def save_profile(profile: Profile, make_default: bool = True) -> None:
    """Write *profile* into the config file (atomically), optionally as the default."""
    cfg = read_config()
    cfg.setdefault("profiles", {})[profile.name] = profile_to_dict(profile)
    if make_default:
        cfg["default_profile"] = profile.name
    write_config(cfg)
