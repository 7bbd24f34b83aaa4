"""Purge forecast: when each dataset's files become purge candidates under the site rule.

The arithmetic is pure (timestamps and ``now`` in, numbers out); only :func:`scan_dataset`
touches the disk, with ``lstat`` calls that change neither atime nor ctime.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .profiles import Profile, PurgeRule
from .registry import DatasetEntry, is_expired

log = logging.getLogger(__name__)

DAY = 86400.0


def effective_age(rule: PurgeRule, atime: float, ctime: float, mtime: float, now: float) -> float:
    """Pure: the age (seconds) the site rule sees for a file.

    ``all``: purged only when every listed timestamp is old → the youngest one counts;
    ``any``: the oldest one counts.
    """
    stamps = {"atime": atime, "ctime": ctime, "mtime": mtime}
    ages = [now - stamps[t] for t in rule.timestamps]
    return min(ages) if rule.combine == "all" else max(ages)


def refresh_protects(rule: PurgeRule) -> bool:
    """Pure: does setting atime (which also sets ctime) reset the rule's clock?"""
    touched = {"atime", "ctime"}
    if rule.combine == "all":
        return bool(touched & set(rule.timestamps))
    return set(rule.timestamps) <= touched


@dataclass
class Forecast:
    """Accumulates one dataset's files; pure (feed it timestamps, read the results)."""

    rule: PurgeRule
    now: float
    cadence_days: float
    files: int = 0
    bytes: int = 0
    oldest_age: float | None = None  # seconds, effective under the rule
    candidates_files: int = 0  # already past the rule's age
    candidates_bytes: int = 0
    at_risk_files: int = 0  # candidates within the next cadence (includes the above)
    at_risk_bytes: int = 0

    def add(self, atime: float, ctime: float, mtime: float, size: int) -> None:
        age = effective_age(self.rule, atime, ctime, mtime, self.now)
        limit = self.rule.age_days * DAY
        self.files += 1
        self.bytes += size
        if self.oldest_age is None or age > self.oldest_age:
            self.oldest_age = age
        if age >= limit:
            self.candidates_files += 1
            self.candidates_bytes += size
        if age + self.cadence_days * DAY >= limit:
            self.at_risk_files += 1
            self.at_risk_bytes += size

    def first_candidate_time(self) -> float | None:
        """When the oldest file becomes a candidate (≤ now: already is); None if no files."""
        if self.oldest_age is None:
            return None
        return self.now + self.rule.age_days * DAY - self.oldest_age


@dataclass
class DatasetForecast:
    name: str
    path: str
    kind: str
    keep_until: str
    rule: str
    files: int = 0
    bytes: int = 0
    oldest_effective_age_days: float | None = None
    first_candidates: str | None = None  # ISO date
    already_candidates_files: int = 0
    already_candidates_bytes: int = 0
    at_risk_files: int = 0
    at_risk_bytes: int = 0
    cadence_days: float = 14.0
    candidate_list_hits: int = 0
    scan_errors: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _date(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts).date()


def summarize(entry: DatasetEntry, profile: Profile, fc: Forecast, *, scheduled: bool | None,
              candidate_hits: int, scan_errors: int = 0) -> DatasetForecast:
    """Pure: turn an accumulated forecast into the report, with its warnings."""
    out = DatasetForecast(entry.name, entry.path, entry.kind, entry.keep_until, profile.rule.describe(),
                          files=fc.files, bytes=fc.bytes, cadence_days=fc.cadence_days,
                          already_candidates_files=fc.candidates_files, already_candidates_bytes=fc.candidates_bytes,
                          at_risk_files=fc.at_risk_files, at_risk_bytes=fc.at_risk_bytes,
                          candidate_list_hits=candidate_hits, scan_errors=scan_errors)
    today = _date(fc.now)
    first = fc.first_candidate_time()
    if fc.oldest_age is not None:
        out.oldest_effective_age_days = round(fc.oldest_age / DAY, 2)
    if first is not None:
        out.first_candidates = max(_date(first), today).isoformat()
    w = out.warnings
    if is_expired(entry, today):
        w.append(f"expired on {entry.keep_until}: no longer refreshed")
    if not profile.rule.stated:
        w.append("the site's purge rule is not stated: this forecast assumes " + profile.rule.describe())
    refusal = profile.refusal()
    if refusal and profile.rule.stated:
        w.append(f"site forbids refresh ({profile.refusal_reason or 'refresh not permitted'}): archive it or "
                 "keep it as a squashfs image on persistent storage")
    if not refresh_protects(profile.rule):
        w.append("the site's rule counts mtime: refreshing access times does not protect these files")
    if fc.candidates_files:
        w.append(f"{fc.candidates_files:,} files are already purge candidates")
    if (first is not None and not is_expired(entry, today) and entry.keep_until_date() >= _date(first)
            and not scheduled):
        w.append(f"keep-until {entry.keep_until} is after the first purge date {out.first_candidates} and "
                 + ("no refresh is scheduled" if scheduled is False else "no refresh schedule was found"))
    if candidate_hits:
        w.append(f"{candidate_hits:,} files are on the site's purge candidate list")
    return out


def iter_tree_stats(root: str, errors: list[int]) -> Iterator[os.stat_result]:
    """lstat of every non-directory entry under *root* (no symlink following, one filesystem)."""
    dev = os.lstat(root).st_dev
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        errors[0] += 1
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        if st.st_dev == dev:
                            stack.append(e.path)
                    else:
                        yield st
        except OSError:
            errors[0] += 1


def count_candidate_hits(list_path: Path | None, dataset_path: str) -> int:
    """Lines of the site's purge-candidate list naming files inside the dataset."""
    if list_path is None:
        return 0
    prefix = dataset_path.rstrip("/") + "/"
    n = 0
    try:
        with open(list_path, "rb") as f:
            pre = os.fsencode(prefix)
            whole = os.fsencode(dataset_path)
            for line in f:
                p = line.rstrip(b"\r\n")
                if p.startswith(pre) or p == whole:
                    n += 1
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("cannot read purge candidate list %s: %s", list_path, e)
    return n


def scan_dataset(entry: DatasetEntry, profile: Profile, now: float, scheduled: bool | None) -> DatasetForecast:
    """Forecast one dataset from a metadata scan (one lstat for a squashfs image)."""
    fc = Forecast(profile.rule, now, profile.scheduler.cadence_days)
    errors = [0]
    if entry.kind == "image":
        try:
            sts: Iterator[os.stat_result] = iter([os.lstat(entry.path)])
        except OSError:
            sts, errors[0] = iter(()), 1
    else:
        try:
            sts = iter_tree_stats(entry.path, errors)
        except OSError:
            sts, errors[0] = iter(()), 1
    for st in sts:
        fc.add(st.st_atime, st.st_ctime, st.st_mtime, st.st_size)
    out = summarize(entry, profile, fc, scheduled=scheduled,
                    candidate_hits=count_candidate_hits(profile.candidate_list_path(), entry.path),
                    scan_errors=errors[0])
    if errors[0]:
        out.warnings.append(f"{errors[0]} entries could not be examined")
    return out
