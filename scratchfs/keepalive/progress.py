"""Progress of long work: a one-line bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``update(units_done, files_done)``; ``close()`` ends the bar line.

    Counts include work finished by earlier (resumed) attempts; the rate counts this run only.
    """

    def __init__(self, label: str, units_total: int, files_total: int, units_done: int = 0, files_done: int = 0,
                 stream: TextIO | None = None, tty: bool | None = None, log_every: float = 10.0) -> None:
        self.label = label
        self.units_total, self.files_total = units_total, files_total
        self.units_done, self.files_done = units_done, files_done
        self.base_files = files_done
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.last = 0.0
        self.log_every = log_every
        self.drawn = False

    def text(self) -> str:
        el = time.monotonic() - self.t0
        rate = (self.files_done - self.base_files) / el if el > 0 else 0.0
        left = self.files_total - self.files_done
        eta = _hms(left / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.units_done}/{self.units_total} units, "
                f"{self.files_done:,}/{self.files_total:,} files, {rate:,.0f} files/s, ETA {eta}")

    def update(self, units_done: int, files_done: int, force: bool = False) -> None:
        self.units_done, self.files_done = units_done, files_done
        now = time.monotonic()
        if self.tty:
            if force or now - self.last >= 0.2:
                frac = self.files_done / self.files_total if self.files_total else 1.0
                bar = "#" * int(frac * 20)
                self.stream.write(f"\r[{bar:<20}] {self.text()}\x1b[K")
                self.stream.flush()
                self.drawn = True
                self.last = now
        elif force or now - self.last >= self.log_every:
            if self.last or force:
                log.info("%s", self.text())
            self.last = now

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
