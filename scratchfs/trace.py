"""Read traces: the file format mountd's ``--record-trace`` writes and the simulator replays.

Format: JSON lines (UTF-8, optionally gzip-compressed when the file name ends in ``.gz``).

* Line 1, the header::

      {"scratchfs_trace": 1, "sizes": {"imagenet.v1": 150000000000, ...},
       "logical_sizes": {"imagenet.v1": 410000000000, ...}}

  ``sizes`` maps each dataset name to its image size in bytes.  ``logical_sizes`` (optional)
  maps a dataset to its logical size: the bytes of its files, uncompressed (from the image's
  manifest).  The read path serves logical bytes while copies and the cache cost image bytes;
  a replay can scale one to the other with these two figures.  A dataset whose logical size is
  unknown is left out.  ``interval`` (optional, seconds) says that each event aggregates the
  reads of its dataset over the ``interval`` seconds before its ``t`` (mountd's recorder writes
  one event per dataset and sampling interval); a replay may spread its bytes over that time.
  Other header keys are allowed and ignored (a recorder may note its host, start time…).

* Then one line per read (or per aggregate of reads of one dataset in a short interval)::

      {"t": 12.5, "dataset": "imagenet.v1", "bytes": 1048576}

  ``t`` is seconds since the start of the recording (non-decreasing), ``bytes`` a non-negative
  integer (bytes served, i.e. logical bytes).

* A line ``{"sizes": {...}, "logical_sizes": {...}}`` (either object may be left out) may
  appear anywhere after the header: datasets that appeared (or changed size) while recording,
  with their logical sizes where known.  The size and the logical size of a dataset are the
  last ones given.

Every dataset an event names must have a size given before that event; a logical size may
only be given for a dataset with a size (given before or on the same line).  A torn last line
(a recorder that crashed mid-write) is ignored with a warning; any other bad line is an error
that names the line.  Traces without ``logical_sizes`` are read as before (no logical sizes).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO

from .errors import NotFoundError, UsageError
from .state import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER_KEY = "scratchfs_trace"
#: Header keys with a meaning of their own; the others are kept in ``Trace.meta``.
_FIELDS = (HEADER_KEY, "sizes", "logical_sizes", "interval")


@dataclass(frozen=True)
class Event:
    t: float
    dataset: str
    nbytes: int


@dataclass
class Trace:
    sizes: dict[str, int]  # dataset → image bytes
    events: list[Event] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)
    logical_sizes: dict[str, int] = field(default_factory=dict)  # dataset → bytes of its files, where known
    interval: float | None = None  # each event stands for the reads of this many seconds before it

    @property
    def duration(self) -> float:
        return self.events[-1].t if self.events else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.events)


def _check_sizes(raw: object, where: str, key: str = "sizes") -> dict[str, int]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: '{key}' must be an object of name: bytes")
    out: dict[str, int] = {}
    for name, size in raw.items():
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"{where}: bad dataset name {name!r}")
        if key == "logical_sizes":
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise UsageError(f"{where}: logical size of {name!r} must be a positive integer (leave unknown ones out)")
        elif isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise UsageError(f"{where}: size of {name!r} must be a non-negative integer")
        out[name] = size
    return out


def _check_interval(raw: object, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise UsageError(f"{where}: 'interval' must be a positive number of seconds")
    return float(raw)


def _add_logical(trace: Trace, raw: object, where: str) -> None:
    logical = _check_sizes(raw, where, "logical_sizes")
    for name in logical:
        if name not in trace.sizes:
            raise UsageError(f"{where}: logical size of {name!r}, which has no size")
    trace.logical_sizes.update(logical)


class TraceWriter:
    """Writes the format above to an open text stream (mountd owns the file and its rotation)."""

    def __init__(self, stream: IO[str], sizes: Mapping[str, int],
                 logical_sizes: Mapping[str, int] | None = None, **meta: object) -> None:  # fmt: skip
        self._f = stream
        self._sizes = {k: int(v) for k, v in sizes.items()}
        self._logical = _known(logical_sizes or {}, self._sizes)
        self._last_t = -math.inf
        header: dict[str, object] = {HEADER_KEY: FORMAT_VERSION, **meta, "sizes": self._sizes}
        if self._logical:
            header["logical_sizes"] = self._logical
        self._f.write(json.dumps(header, separators=(",", ":"), sort_keys=True) + "\n")

    def sizes(self, changed: Mapping[str, int], logical_sizes: Mapping[str, int] | None = None) -> None:
        """Record datasets that appeared or changed size, and logical sizes newly known or changed.

        Logical sizes of datasets without a size (here or before), or not positive, are left out.
        """
        new = {k: int(v) for k, v in changed.items() if self._sizes.get(k) != v}
        self._sizes.update(new)
        logical = {k: v for k, v in _known(logical_sizes or {}, self._sizes).items() if self._logical.get(k) != v}
        self._logical.update(logical)
        line: dict[str, object] = {}
        if new:
            line["sizes"] = new
        if logical:
            line["logical_sizes"] = logical
        if line:
            self._f.write(json.dumps(line, separators=(",", ":"), sort_keys=True) + "\n")

    def event(self, t: float, dataset: str, nbytes: int) -> None:
        if dataset not in self._sizes:
            raise ValueError(f"no size recorded for dataset {dataset!r}")
        t = max(t, self._last_t)  # keep t non-decreasing even if the caller's clock jitters
        self._last_t = t
        self._f.write(f'{{"t":{t:.6f},"dataset":{json.dumps(dataset)},"bytes":{int(nbytes)}}}\n')

    def flush(self) -> None:
        self._f.flush()


def _known(logical: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in logical.items() if k in sizes and int(v) > 0}


def write_trace(path: str | os.PathLike[str], trace: Trace) -> None:
    """Write a whole trace atomically (``.gz`` → gzip)."""
    with atomic_open(path, "wb") as raw:
        stream: IO[bytes] = raw
        if str(path).endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)  # type: ignore[assignment]
        text = io.TextIOWrapper(stream, encoding="utf-8")
        meta = {k: v for k, v in trace.meta.items() if k not in _FIELDS}
        if trace.interval is not None:
            meta["interval"] = trace.interval
        w = TraceWriter(text, trace.sizes, trace.logical_sizes, **meta)
        for e in trace.events:
            w.event(e.t, e.dataset, e.nbytes)
        text.flush()
        text.detach()
        if stream is not raw:
            stream.close()


def _lines(path: str | os.PathLike[str]) -> Iterator[str]:
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                yield from f
        else:
            with open(path, encoding="utf-8") as f:
                yield from f
    except FileNotFoundError:
        raise NotFoundError(f"trace not found: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: unreadable trace: {e}") from None


def parse_lines(lines: Iterable[str], where: str = "trace") -> Trace:
    """Parse the format from an iterable of lines."""
    trace: Trace | None = None
    last_t = -math.inf
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        loc = f"{where}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if line.endswith("\n"):
                raise UsageError(f"{loc}: not a JSON object") from None
            # Only the last line can lack its newline: a recorder stopped mid-write.
            log.warning("%s: ignoring torn last line", loc)
            break
        if not isinstance(rec, dict):
            raise UsageError(f"{loc}: not a JSON object")
        if trace is None:
            if rec.get(HEADER_KEY) != FORMAT_VERSION:
                raise UsageError(f"{loc}: not a scratchfs trace (header needs \"{HEADER_KEY}\": {FORMAT_VERSION})")
            sizes = _check_sizes(rec.get("sizes", {}), loc)
            meta = {k: v for k, v in rec.items() if k not in _FIELDS}
            trace = Trace(sizes=sizes, meta=meta, interval=_check_interval(rec.get("interval"), loc))
            _add_logical(trace, rec.get("logical_sizes", {}), loc)
            continue
        if "t" not in rec and ("sizes" in rec or "logical_sizes" in rec):
            trace.sizes.update(_check_sizes(rec.get("sizes", {}), loc))
            _add_logical(trace, rec.get("logical_sizes", {}), loc)
            continue
        t, name, nbytes = rec.get("t"), rec.get("dataset"), rec.get("bytes")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise UsageError(f"{loc}: 't' must be a non-negative number of seconds")
        if t < last_t:
            raise UsageError(f"{loc}: 't' goes backwards ({t} after {last_t})")
        if not isinstance(name, str) or name not in trace.sizes:
            raise UsageError(f"{loc}: dataset {name!r} has no size (add it to the header or a 'sizes' line)")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise UsageError(f"{loc}: 'bytes' must be a non-negative integer")
        last_t = t
        trace.events.append(Event(float(t), name, nbytes))
    if trace is None:
        raise UsageError(f"{where}: empty trace (no header line)")
    return trace


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Load a trace file (see the module docstring)."""
    return parse_lines(_lines(path), where=os.fspath(path))
