"""Progress of long image work: a bar on a terminal, periodic log lines otherwise.

The formatting is pure (numbers and elapsed seconds in, text out); the Reporter only decides
when to draw, from the times its caller passes in.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TextIO

from ..units import format_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float  # seconds since the work started


def rate(s: Snapshot) -> float:
    """Bytes per second so far (0 before any time has passed)."""
    return s.bytes_done / s.elapsed if s.elapsed > 0 else 0.0


def eta(s: Snapshot) -> float | None:
    """Seconds left at the average rate so far; None while nothing is known."""
    r = rate(s)
    if r <= 0 or s.bytes_total <= 0:
        return None
    return max(0.0, (s.bytes_total - s.bytes_done) / r)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def fraction(s: Snapshot) -> float:
    if s.bytes_total > 0:
        return min(1.0, s.bytes_done / s.bytes_total)
    if s.files_total > 0:
        return min(1.0, s.files_done / s.files_total)
    return 0.0


def format_line(s: Snapshot, what: str = "") -> str:
    """'build: 1200/2004 files, 80.0 MiB/129.9 MiB (61%), 95.2 MiB/s, ETA 00:01'"""
    pct = int(fraction(s) * 100)
    prefix = f"{what}: " if what else ""
    return (
        f"{prefix}{s.files_done}/{s.files_total} files, {format_size(s.bytes_done)}/{format_size(s.bytes_total)}"
        f" ({pct}%), {format_size(rate(s))}/s, ETA {format_duration(eta(s))}"
    )


def format_bar(s: Snapshot, width: int = 24) -> str:
    """'[#########...............]  37%  740/2004 files  48.1 MiB/129.9 MiB  95.2 MiB/s  ETA 00:01'"""
    frac = fraction(s)
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {int(frac * 100):3d}%  {s.files_done}/{s.files_total} files  "
        f"{format_size(s.bytes_done)}/{format_size(s.bytes_total)}  {format_size(rate(s))}/s  "
        f"ETA {format_duration(eta(s))}"
    )


class Reporter:
    """Draws a bar (tty) at most every *bar_interval* s, or logs a line every *log_interval* s."""

    def __init__(
        self,
        what: str,
        stream: TextIO | None = None,
        tty: bool | None = None,
        bar_interval: float = 0.2,
        log_interval: float = 10.0,
    ) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = bar_interval if self.tty else log_interval
        self._last: float | None = None
        self._drawn = False

    def update(self, s: Snapshot, now: float, force: bool = False) -> None:
        if self._last is None and not self.tty and not force:
            self._last = now  # the first log line comes one interval after the start
            return
        if not force and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        self._drawn = True
        if self.tty:
            self.stream.write("\r" + format_bar(s) + "\x1b[K")
            self.stream.flush()
        else:
            log.info("%s", format_line(s, self.what))

    def finish(self, s: Snapshot) -> None:
        if self.tty:
            self.stream.write("\r" + format_bar(s) + "\x1b[K\n")
            self.stream.flush()
        elif self._drawn:
            log.info("%s", format_line(s, self.what))
