"""Prometheus text exposition of mountd's status (the same figures ``scratchfs status`` shows).

:func:`render` is pure: the status document in, text out. mountd writes the text atomically
(through :mod:`scratchfs.state`) to the file node_exporter's textfile collector reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .state import atomic_write

PREFIX = "scratchfs_mountd"

# name suffix, type, help, how to get the value from one dataset's status
_DATASET_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("dataset_size_bytes", "gauge", "Size of the dataset's image.", "size"),
    ("dataset_throughput_bytes_per_second", "gauge", "Read throughput over the window.", "rate"),
    ("dataset_hit_ratio", "gauge", "Bytes served from the cache tier / all bytes served.", "hit_ratio"),
    ("dataset_cached", "gauge", "1 when the dataset is served from the local cache.", "cached"),
    ("dataset_pinned", "gauge", "1 when the dataset is pinned in the cache.", "pinned"),
    ("dataset_backing_present", "gauge", "0 when the backing image on scratch is gone.", "backing_present"),
    ("dataset_last_promotion_timestamp_seconds", "gauge", "When the dataset was last promoted.", "last_promotion"),
    ("dataset_last_demotion_timestamp_seconds", "gauge", "When the dataset was last demoted.", "last_demotion"),
    ("dataset_copy_done_bytes", "gauge", "Bytes copied by the copy in progress.", "copy_done"),
    ("dataset_copy_ratio", "gauge", "Fraction done of the copy in progress.", "copy_fraction"),
    ("dataset_copy_failures_total", "counter", "Failed copies of the dataset.", "copy_failures"),
    ("dataset_copied_bytes_total", "counter", "Bytes read from scratch by copies of the dataset.", "bytes_copied"),
    ("dataset_copied_back_total", "counter", "Copies of the dataset soon after the policy demoted it.", "copied_back"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _dataset_value(d: Mapping[str, Any], key: str) -> Any:
    copy = d.get("copy") or {}
    if key == "cached":
        return d.get("tier") == "cache"
    if key == "backing_present":
        return not d.get("backing_gone", False)
    if key == "copy_done":
        return copy.get("bytes_done") if copy else None
    if key == "copy_fraction":
        return copy.get("fraction") if copy else None
    return d.get(key)


def render(status: Mapping[str, Any]) -> str:
    """Prometheus text format of a status document (see mountd.daemon.Daemon.status)."""
    lines: list[str] = []
    datasets: Iterable[Mapping[str, Any]] = status.get("datasets", [])
    datasets = list(datasets)
    for suffix, kind, help_text, key in _DATASET_METRICS:
        name = f"{PREFIX}_{suffix}"
        samples = []
        for d in datasets:
            v = _dataset_value(d, key)
            if v is None:
                continue
            samples.append(f'{name}{{dataset="{_escape(str(d["name"]))}"}} {_num(v)}')
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    name = f"{PREFIX}_dataset_read_bytes_total"
    lines += [f"# HELP {name} Bytes served per tier since mountd started.", f"# TYPE {name} counter"]
    for d in datasets:
        for tier, key in (("scratch", "bytes_scratch"), ("cache", "bytes_cache")):
            lines.append(f'{name}{{dataset="{_escape(str(d["name"]))}",tier="{tier}"}} {_num(d.get(key, 0))}')
    cache = status.get("cache") or {}
    for key, help_text in (
        ("used", "Bytes of cached copies (copies in progress included)."),
        ("budget", "Bytes the policy may hold in the cache this round."),
        ("capacity", "Configured cache capacity."),
        ("free", "Free bytes of the cache filesystem minus the reserve."),
        ("reclaimable", "Bytes of demoted datasets' copies and of cancelled copies kept until their space is needed."),
    ):
        if key in cache and cache[key] is not None:
            name = f"{PREFIX}_cache_{key}_bytes"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(cache[key])}"]
    name = f"{PREFIX}_datasets"
    lines += [f"# HELP {name} Datasets served.", f"# TYPE {name} gauge", f"{name} {len(datasets)}"]
    return "\n".join(lines) + "\n"


def write(path: str, status: Mapping[str, Any]) -> None:
    """Write the metrics file atomically (readable by everyone)."""
    atomic_write(path, render(status), perms=0o644)
