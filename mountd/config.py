"""mountd's configuration: ``/etc/scratchfs/mountd.toml``, validated, with command-line overrides.

Every problem is a one-line :class:`~scratchfs.errors.UsageError` naming the key (or the
command-line flag) and what is wrong, raised before anything is mounted.  See
``packaging/mountd.toml`` for a commented sample.

Keys (all top level):

==================  =====================================================  =================
key                 value                                                  default
==================  =====================================================  =================
``datadir``         directory of ``NAME.sqfs`` images, or a list of them   required
``cachedir``        directory on the node-local SSD for cached copies      required
``mountdir``        where the single FUSE mount goes                       required
``capacity``        bytes mountd may use in cachedir: ``"800G"``, an       ``"80%"``
                    integer, or ``"N%"`` of the cache filesystem's size
``reserve``         free space never to use on the cache filesystem        ``"5%"``
                    (bytes or ``"N%"``)
``window``          throughput window: ``"10m"``, seconds                  ``"10m"``
``min_residency``   a promoted dataset stays at least this long; 0: no     ``0``
                    floor (the policy's hysteresis keeps it from flapping)
``copy_bandwidth``  copier limit, bytes/s (``"200M"``); 0 = unlimited      ``0``
``pinned``          dataset names always held in the cache if they fit     ``[]``
``never_cache``     dataset names never copied to the cache                ``[]``
``allow_other``     let every user read the mount (FUSE ``allow_other``)   ``true``
``control_group``   group allowed to use ``scratchfs ctl`` besides root    none (root only)
``control_socket``  the control socket ``scratchfs status``/``ctl`` use     ``"/run/scratchfs/mountd.sock"``
``metrics_file``    Prometheus text metrics written here every second      none (no metrics)
``block_cache``     decoded-block cache per image (bytes with unit)        ``"64M"``
``threads``         decompression/readahead threads                        number of cores
``scan_interval``   time between scans of the data directories             ``"2s"``
``policy_interval`` time between promotion policy rounds                   ``"2s"``
==================  =====================================================  =================

Each key has a command-line flag (:data:`_FLAGS`); the value used is the flag's if given, else
the file's, else the default above.  A SIGHUP reload reads the file again and applies the
same flags on top; keys in :data:`RESTART_KEYS` keep their running value until a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import grp
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchfs.errors import NotFoundError, UsageError
from scratchfs.status_cmd import DEFAULT_SOCKET
from scratchfs.units import parse_duration, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/scratchfs/mountd.toml")

#: Configuration key → MountdConfig field, where they differ (control_group is also kept as named).
FIELD_OF = {"datadir": "datadirs", "control_group": "control_gid"}

#: Keys a SIGHUP reload cannot change: they need a restart.  (The socket is bound, the FUSE
#: mount and its worker threads exist, open images have their block caches, the throughput
#: statistics were built for the window.)  Everything else applies from the next round.
RESTART_KEYS = frozenset({
    "datadir", "cachedir", "mountdir", "allow_other", "control_group", "control_socket", "threads",
    "block_cache", "window",
})  # fmt: skip

#: Shortest scan or policy interval: anything shorter would keep the daemon busy for nothing.
MIN_INTERVAL = 0.1


@dataclass(frozen=True)
class Share:
    """A capacity or reserve: a byte count, or a percentage of the cache filesystem."""

    nbytes: int | None = None
    percent: float | None = None

    def resolve(self, fs_total: int) -> int:
        """Bytes, given the cache filesystem's total size."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.percent is not None
        return int(fs_total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.nbytes)


@dataclass(frozen=True)
class MountdConfig:
    datadirs: tuple[Path, ...]
    cachedir: Path
    mountdir: Path
    capacity: Share = Share(percent=80.0)
    reserve: Share = Share(percent=5.0)
    window: float = 600.0
    min_residency: float = 0.0
    copy_bandwidth: int = 0
    pinned: frozenset[str] = frozenset()
    never_cache: frozenset[str] = frozenset()
    allow_other: bool = True
    control_group: str | None = None
    control_gid: int | None = None
    control_socket: Path = Path(DEFAULT_SOCKET)
    metrics_file: Path | None = None
    block_cache: int = 64 << 20
    threads: int | None = None  # None: as many as cores
    scan_interval: float = 2.0
    policy_interval: float = 2.0
    source: str = "<defaults>"

    def capacity_bytes(self, fs_total: int) -> int:
        """The byte budget, given the cache filesystem's total size."""
        return self.capacity.resolve(fs_total)

    def reserve_bytes(self, fs_total: int) -> int:
        return self.reserve.resolve(fs_total)

    def cache_fs_total(self) -> int:
        """Total size of the cache filesystem (reads the disk; not used by parsing)."""
        st = os.statvfs(self.cachedir)
        return st.f_frsize * st.f_blocks

    def restart_needed(self, new: MountdConfig) -> list[str]:
        """Keys whose change *new* brings that a reload cannot apply."""
        return sorted(k for k in RESTART_KEYS if getattr(self, FIELD_OF.get(k, k)) != getattr(new, FIELD_OF.get(k, k)))


# -- value parsers: each raises UsageError with the message after "KEY: " ----------------------


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError("must be a path (a non-empty string)")
    if "\0" in value:
        raise UsageError("must not contain NUL")
    p = Path(value)
    if not p.is_absolute():
        raise UsageError(f"must be an absolute path, not {value!r}")
    return Path(os.path.normpath(p))


def _paths(value: object) -> tuple[Path, ...]:
    if isinstance(value, str):
        return (_path(value),)
    if isinstance(value, list) and value:
        out = tuple(_path(v) for v in value)
        if len(set(out)) != len(out):
            raise UsageError("lists a directory twice")
        return out
    raise UsageError("must be a path or a non-empty list of paths")


def _share(value: object, *, allow_zero: bool) -> Share:
    if isinstance(value, str) and value.strip().endswith("%"):
        num = value.strip()[:-1].strip()
        try:
            pct = float(num)
        except ValueError:
            raise UsageError(f"not a percentage: {value!r}") from None
        lo_ok = pct >= 0 if allow_zero else pct > 0
        if not (lo_ok and pct <= 100) or pct != pct:
            raise UsageError(f"percentage out of range: {value!r}")
        return Share(percent=pct)
    n = _size(value)
    if n == 0 and not allow_zero:
        raise UsageError("must be more than 0")
    return Share(nbytes=n)


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise UsageError(f"not a size: {value!r}")
    if isinstance(value, float):
        if value != value or value < 0 or value != int(value):
            raise UsageError(f"not a size: {value!r} (use a whole number of bytes or a unit: 512M)")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"must not be negative: {value}")
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise UsageError(f"not a size: {value!r}")


def _duration(value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"not a duration: {value!r}")
    secs = parse_duration(value)
    if secs != secs or secs in (float("inf"), float("-inf")):
        raise UsageError(f"not a duration: {value!r}")
    if secs < 0 or (positive and secs == 0):
        raise UsageError(f"must be {'more than 0' if positive else 'at least 0'}: {value!r}")
    return secs


def _interval(value: object) -> float:
    secs = _duration(value, positive=True)
    if secs < MIN_INTERVAL:
        raise UsageError(f"must be at least {MIN_INTERVAL:g}s: {value!r}")
    return secs


def _threads(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"must be a whole number of threads, at least 1, not {value!r}")
    return value


def _names(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        raise UsageError("must be a list of dataset names")
    for v in value:
        if not isinstance(v, str) or not v or "/" in v or v in (".", "..") or "\0" in v:
            raise UsageError(f"not a dataset name: {v!r}")
    return frozenset(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"must be true or false, not {value!r}")
    return value


def _group(value: object) -> tuple[str, int]:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UsageError("must be a group name or gid")
    try:
        g = grp.getgrgid(value) if isinstance(value, int) else grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise UsageError(f"no such group: {value!r}") from None
    return g.gr_name, g.gr_gid


# key → (parser, field name)
_PARSERS: dict[str, Any] = {
    "datadir": _paths,
    "cachedir": _path,
    "mountdir": _path,
    "capacity": lambda v: _share(v, allow_zero=False),
    "reserve": lambda v: _share(v, allow_zero=True),
    "window": lambda v: _duration(v, positive=True),
    "min_residency": lambda v: _duration(v, positive=False),
    "copy_bandwidth": _size,
    "pinned": _names,
    "never_cache": _names,
    "allow_other": _bool,
    "control_group": _group,
    "control_socket": _path,
    "metrics_file": _path,
    "block_cache": _size,
    "threads": _threads,
    "scan_interval": _interval,
    "policy_interval": _interval,
}
KEYS = frozenset(_PARSERS)
REQUIRED = ("datadir", "cachedir", "mountdir")


def _parse_value(key: str, value: object, label: str) -> dict[str, Any]:
    """Parse one key → the dataclass fields it sets.  *label* names it in errors."""
    try:
        parsed = _PARSERS[key](value)
    except UsageError as e:
        raise UsageError(f"{label}: {e}") from None
    if key == "datadir":
        return {"datadirs": parsed}
    if key == "control_group":
        return {"control_group": parsed[0], "control_gid": parsed[1]}
    return {key: parsed}


def _unknown(key: str, source: str) -> UsageError:
    close = difflib.get_close_matches(key, sorted(KEYS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{source}: unknown key {key!r}{hint}")


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _validate(cfg: MountdConfig, label: Mapping[str, str]) -> MountdConfig:
    """Checks across keys; *label* maps a key to how errors should name it."""
    for d in cfg.datadirs:
        if _overlap(d, cfg.cachedir):
            raise UsageError(f"{label['cachedir']}: {cfg.cachedir} overlaps datadir {d}")
        if _overlap(d, cfg.mountdir):
            raise UsageError(f"{label['mountdir']}: {cfg.mountdir} overlaps datadir {d}")
    if _overlap(cfg.cachedir, cfg.mountdir):
        raise UsageError(f"{label['mountdir']}: {cfg.mountdir} overlaps cachedir {cfg.cachedir}")
    for key in ("control_socket", "metrics_file"):
        path = getattr(cfg, key)
        if path is not None and (path == cfg.mountdir or cfg.mountdir in path.parents):
            raise UsageError(f"{label[key]}: {path} is inside mountdir {cfg.mountdir}")
    if cfg.metrics_file is not None and cfg.metrics_file == cfg.control_socket:
        raise UsageError(f"{label['metrics_file']}: {cfg.metrics_file} is also the control socket")
    both = cfg.pinned & cfg.never_cache
    if both:
        raise UsageError(f"{label['pinned']}: {', '.join(sorted(both))} also listed in never_cache")
    cap, res = cfg.capacity, cfg.reserve
    if cap.percent is not None and res.percent is not None and cap.percent + res.percent > 100:
        raise UsageError(f"{label['capacity']}: {cap} plus reserve {res} is more than the whole filesystem")
    return cfg


def parse_config(data: Mapping[str, object], source: str = "mountd.toml") -> MountdConfig:
    """Validate a parsed TOML document.  *source* prefixes error messages."""
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            raise _unknown(key, source)
        fields.update(_parse_value(key, value, f"{source}: {key}"))
    for key in REQUIRED:
        if key not in data:
            raise UsageError(f"{source}: {key}: missing (required)")
    cfg = MountdConfig(**fields, source=source)
    return _validate(cfg, {k: f"{source}: {k}" for k in KEYS})


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> MountdConfig:
    """Read and validate a config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"config file not found: {p}") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, source=str(p))


# -- command line -----------------------------------------------------------------------------

#: key → (flag, help).  List-valued keys take a comma-separated list on the command line.
_FLAGS = {
    "datadir": ("--datadir", "image directory (repeatable: replaces the config's list)"),
    "cachedir": ("--cachedir", "cache directory on local SSD"),
    "mountdir": ("--mountdir", "mount point"),
    "capacity": ("--capacity", "cache budget: bytes with unit, or N%% of the cache filesystem"),
    "reserve": ("--reserve", "free space never to use (bytes or N%%)"),
    "window": ("--window", "throughput window (e.g. 10m)"),
    "min_residency": ("--min-residency", "minimum time a promoted dataset stays"),
    "copy_bandwidth": ("--copy-bandwidth", "copier limit, bytes/s (0 = unlimited)"),
    "pinned": ("--pinned", "comma-separated dataset names always cached"),
    "never_cache": ("--never-cache", "comma-separated dataset names never cached"),
    "allow_other": ("--allow-other", "let every user read the mount (yes/no)"),
    "control_group": ("--control-group", "group allowed to use `scratchfs ctl`"),
    "control_socket": ("--socket", f"control socket (default {DEFAULT_SOCKET})"),
    "metrics_file": ("--metrics", "write Prometheus text metrics to this file"),
    "block_cache": ("--block-cache", "decoded-block cache per image (default 64M)"),
    "threads": ("--threads", "decompression threads (default: cores)"),
    "scan_interval": ("--scan-interval", "time between data directory scans (default 2s)"),
    "policy_interval": ("--policy-interval", "time between policy rounds (default 2s)"),
}

_PATH_KEYS = ("datadir", "cachedir", "mountdir", "control_socket", "metrics_file")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config key; unset flags leave the file's value alone."""
    group = parser.add_argument_group("settings (override the config file)")
    for key, (flag, help_text) in _FLAGS.items():
        if key == "datadir":
            group.add_argument(flag, dest=f"cfg_{key}", action="append", metavar="DIR", help=help_text)
        else:
            group.add_argument(flag, dest=f"cfg_{key}", metavar=key.upper(), help=help_text)
    # every flag defaults to "not given" (None): the file's value, else the default, applies


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, as raw values for :func:`apply_overrides`."""
    out: dict[str, object] = {}
    for key in _FLAGS:
        value = getattr(args, f"cfg_{key}", None)
        if value is not None:
            out[key] = value
    return out


def _from_cli(key: str, value: object) -> object:
    """Command-line strings → the TOML-shaped value the parser expects."""
    if not isinstance(value, str):
        if key == "datadir" and isinstance(value, list):
            return [os.path.abspath(v) if isinstance(v, str) and v else v for v in value]
        return value
    if key in _PATH_KEYS:
        return os.path.abspath(value) if value else value
    if key in ("pinned", "never_cache"):
        return [v.strip() for v in value.split(",") if v.strip()]
    if key == "allow_other":
        low = value.strip().lower()
        if low in ("1", "yes", "true", "on"):
            return True
        if low in ("0", "no", "false", "off"):
            return False
        raise UsageError(f"{_FLAGS[key][0]}: must be yes or no, not {value!r}")
    if key == "control_group" and value.isdigit():
        return int(value)
    if key == "threads":
        try:
            return int(value)
        except ValueError:
            return value  # the parser names the flag and the value
    return value


def apply_overrides(cfg: MountdConfig, overrides: Mapping[str, object]) -> MountdConfig:
    """A copy of *cfg* with command-line *overrides* (key → raw value) applied and re-validated.

    Errors name the flag (``--capacity: …``).
    """
    fields: dict[str, Any] = {}
    labels = {k: f"{cfg.source}: {k}" for k in KEYS}
    for key, value in overrides.items():
        if key not in KEYS:
            raise _unknown(key, "command line")
        flag = _FLAGS[key][0]
        fields.update(_parse_value(key, _from_cli(key, value), flag))
        labels[key] = flag
    return _validate(dataclasses.replace(cfg, **fields), labels)
