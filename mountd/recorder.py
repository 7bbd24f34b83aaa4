"""``--record-trace``: the reads mountd serves, written in the trace format of scratchfs.trace.

The FUSE read path only adds bytes to a per-dataset counter (:meth:`TraceRecorder.count`, O(1));
the sampler writes one event per dataset and sampling interval (:meth:`TraceRecorder.flush`).
Each dataset's image size and, where its manifest tells it, its logical size (bytes of its
files) are written in the header, and again on a ``sizes`` line when a dataset appears or
changes, so a replay can scale the bytes served to image bytes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping

from scratchfs.trace import TraceWriter

log = logging.getLogger(__name__)


class TraceRecorder:
    def __init__(self, path: str, t0: float, sizes: Mapping[str, int],
                 logical_sizes: Mapping[str, int] | None = None, interval: float = 1.0) -> None:  # fmt: skip
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._t0 = t0
        self._pending: dict[str, int] = {}
        # interval: the sampling interval, which each event aggregates the reads of
        self._writer = TraceWriter(self._file, sizes, logical_sizes, recorder="scratchfs-mountd", started=time.time(),
                                   interval=interval)  # fmt: skip

    def count(self, dataset: str, nbytes: int) -> None:
        self._pending[dataset] = self._pending.get(dataset, 0) + nbytes

    def flush(self, now: float, sizes: Mapping[str, int], logical_sizes: Mapping[str, int] | None = None) -> bool:
        """Write what was counted since the last flush; False once recording had to stop.

        *sizes* and *logical_sizes* are the datasets' current figures: what changed since the
        last flush is written before the events.
        """
        pending, self._pending = self._pending, {}
        try:
            self._writer.sizes(sizes, logical_sizes)
            t = now - self._t0
            for name, nbytes in sorted(pending.items()):
                if nbytes:
                    with contextlib.suppress(ValueError):  # a dataset gone before its first size line
                        self._writer.event(t, name, nbytes)
            self._writer.flush()
        except OSError as e:
            log.error("trace recording stopped: %s", e)
            with contextlib.suppress(OSError):
                self._file.close()
            return False
        return True

    def close(self, now: float, sizes: Mapping[str, int], logical_sizes: Mapping[str, int] | None = None) -> None:
        if self.flush(now, sizes, logical_sizes):
            with contextlib.suppress(OSError):
                self._file.close()
