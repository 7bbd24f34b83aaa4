"""Sliding-window throughput per dataset and per tier, with totals since start.

The FUSE read path calls :meth:`ThroughputStats.record` once per read request it serves, so
recording must stay cheap: one dict lookup and a handful of integer operations (O(1), no
allocation once a dataset/tier pair has been seen).  Time is injected (``now`` in seconds from
any monotonic origin); this module never reads a clock.

The window is split into ``buckets`` time buckets of ``window / buckets`` seconds.  A request is
counted in bucket ``floor(now / width)``; each dataset/tier pair keeps a ring of ``buckets``
slots tagged with the bucket index they currently hold, so a slot left over from an earlier
revolution of the ring is recognised as stale and reset on the next write (or ignored on read).

The window at time ``now`` covers the current, partly elapsed bucket and the ``buckets - 1``
buckets before it.  Throughput is the bytes counted there divided by the time they cover:
``(buckets - 1) * width + (now - start of the current bucket)``, but never more than the time
since the statistics started (so a freshly started daemon does not under-report by averaging
over time it did not observe).

Requests arriving with a time older than the window (a caller whose clock went backwards) still
count in the totals but not in the window.

Runs
----
Snapshots also follow each dataset's *runs*: a run begins with the first bucket holding bytes
after a snapshot found the window empty, and ends at the first snapshot that finds the window
empty again (so runs are separated by at least a window without reads).  Per dataset the
snapshot reports the bytes of the current run and of the previous run: what lets the
promotion policy tell a dataset read long, again and again, from one read once end to end.
Within a run, a *pause* begins at a snapshot that finds no reads in the newest
``PAUSE_BUCKETS`` buckets; it either ends with reads again (counted in ``resumed``) or ends the
run (counted in ``runs``): whether the workload reads datasets on and off, job after job, or
stops reading them for good when they pause.  A finished run followed by reads again less
than ``RETURN_WINDOWS`` windows after its last read is also counted in ``returns`` (it still
separates the two runs and counts in ``runs``): a dataset read by one job after another, with
a gap between jobs a little longer than the window, is read on and off all the same.

Long-term rate
--------------
Per dataset the snapshot also carries its reads decayed exponentially with the time constant
``tau`` (``LONG_WINDOWS`` windows by default): ``long_bytes`` at ``long_at``;
:meth:`DatasetStats.long_rate` turns them into bytes/s at any later time.  Under constant
demand ``r`` it tends to ``r``; it remembers a dataset read job after job through its pauses
for several windows, where the window rate forgets it within one.
Datasets seen before are remembered (totals and last run) until
:meth:`ThroughputStats.forget` or :meth:`ThroughputStats.retain`.  Like ``active_since``, runs
rely on snapshots being taken more often than once per window.

A dataset with nothing in the window and no run to close reports the same figures from one
snapshot to the next; its :class:`DatasetStats` is reused, so a snapshot of many idle datasets
stays cheap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Tier names used by the read path.  Any other string is accepted as a tier too.
SCRATCH = "scratch"
CACHE = "cache"



#: Buckets per window, unless told otherwise (mountd's counters).
BUCKETS = 60
#: A run pauses when this many of its newest buckets (the one filling now included) hold no reads.
PAUSE_BUCKETS = 3
#: A finished run counts as a return too if reads came again within this many windows of its
#: last read.
RETURN_WINDOWS = 2.0
#: Time constant of the long-term rate, in windows.
LONG_WINDOWS = 8.0


class _Run:
    """Run bookkeeping of one dataset, updated by snapshots only."""

    __slots__ = ("since", "base", "prev_bytes", "runs", "paused", "resumed", "idle", "ended", "decayed", "decayed_at", "decayed_total", "returns")

    def __init__(self) -> None:
        self.since: float | None = None  # start of the current run, None between runs
        self.base = 0  # the dataset's total bytes before the current run
        self.prev_bytes = 0  # bytes of the previous finished run
        self.runs = 0  # finished runs
        self.paused = False  # the current run is in a pause
        self.resumed = 0  # pauses that ended with reads again, within their run
        self.idle: DatasetStats | None = None  # figures while nothing is in the window
        self.ended: float | None = None  # end of the last read of the previous run
        self.decayed = 0.0  # reads decayed with the time constant tau, as of decayed_at
        self.decayed_at = 0.0
        self.decayed_total = 0  # the dataset's total bytes as of decayed_at
        self.returns = 0  # finished runs followed by reads again within RETURN_WINDOWS windows


class _Ring:
    """Counters of one dataset on one tier: a bucket ring plus totals."""

    __slots__ = ("tags", "nbytes", "nreqs", "total_bytes", "total_reqs", "last")

    def __init__(self, n: int) -> None:
        self.tags = [-1] * n  # bucket index each slot currently holds; -1 = never written
        self.nbytes = [0] * n
        self.nreqs = [0] * n
        self.total_bytes = 0
        self.total_reqs = 0
        self.last = -1  # newest bucket index written


@dataclass(frozen=True)
class TierStats:
    """One dataset on one tier: window figures and totals since start."""

    window_bytes: int
    window_requests: int
    rate: float  # bytes/s over the window
    total_bytes: int
    total_requests: int


@dataclass(frozen=True)
class DatasetStats:
    """One dataset across tiers."""

    name: str
    tiers: Mapping[str, TierStats]
    rate: float  # bytes/s over the window, all tiers together: the demand on this dataset
    recent_rate: float  # bytes/s over the most recent `recent` part of the window
    active_since: float | None  # start of the current run of activity (see ThroughputStats.snapshot)
    window_bytes: int
    total_bytes: int
    total_requests: int
    run_bytes: int = 0  # bytes of the current run (0 between runs)
    last_run_bytes: int = 0  # bytes of the previous finished run
    runs: int = 0  # finished runs
    resumed: int = 0  # pauses within a run that ended with reads again (see the module docstring)
    returns: int = 0  # finished runs followed by reads again within RETURN_WINDOWS windows
    last_read: float | None = None  # end of the newest bucket holding reads (at most now); None: never read
    long_bytes: float = 0.0  # reads decayed with the snapshot's time constant tau, as of long_at
    long_at: float = 0.0

    def long_rate(self, now: float, tau: float) -> float:
        """The long-term rate (bytes/s) at *now* (at least ``long_at``; see the module docstring)."""
        if tau <= 0:
            return 0.0
        return self.long_bytes * math.exp(-max(now - self.long_at, 0.0) / tau) / tau

    def tier_total(self, tier: str) -> int:
        t = self.tiers.get(tier)
        return t.total_bytes if t else 0

    @property
    def hit_ratio(self) -> float | None:
        """Bytes served from the cache tier / all bytes served, since start (None: nothing read)."""
        if self.total_bytes == 0:
            return None
        return self.tier_total(CACHE) / self.total_bytes


@dataclass(frozen=True)
class StatsSnapshot:
    """All datasets at one instant; what the promotion policy consumes."""

    now: float
    window: float
    span: float  # seconds the window figures really cover
    resolution: float  # bucket width, seconds
    datasets: Mapping[str, DatasetStats] = field(default_factory=dict)
    tau: float = 0.0  # time constant of the long-term rates, seconds

    def rate(self, name: str) -> float:
        d = self.datasets.get(name)
        return d.rate if d else 0.0

    def recent_rate(self, name: str) -> float:
        d = self.datasets.get(name)
        return d.recent_rate if d else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.datasets.values())

    def tier_total(self, tier: str) -> int:
        return sum(d.tier_total(tier) for d in self.datasets.values())

    @property
    def hit_ratio(self) -> float | None:
        total = self.total_bytes
        return self.tier_total(CACHE) / total if total else None


class ThroughputStats:
    """Per dataset, per tier: bytes and requests in a sliding window, and totals since start.

    ``recent_fraction`` selects the part of the window reported as ``recent_rate`` (the newest
    buckets only), which lets the policy notice a dataset that just became hot without waiting
    for a whole window.
    """

    def __init__(
        self,
        window: float,
        buckets: int = BUCKETS,
        *,
        start: float = 0.0,
        recent_fraction: float = 0.25,
    ) -> None:
        if not window > 0 or not math.isfinite(window):
            raise ValueError(f"window must be a positive number of seconds, not {window!r}")
        if buckets < 2:
            raise ValueError("need at least 2 buckets")
        if not 0 < recent_fraction <= 1:
            raise ValueError("recent_fraction must be in (0, 1]")
        self.window = float(window)
        self.buckets = int(buckets)
        self.width = self.window / self.buckets
        self.start = float(start)
        self.recent_buckets = max(1, round(self.buckets * recent_fraction))
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._by_name: dict[str, list[tuple[str, _Ring]]] = {}  # the rings of each dataset
        self._runs: dict[str, _Run] = {}
        self.tau = LONG_WINDOWS * self.window

    # -- hot path -------------------------------------------------------------------------

    def record(self, dataset: str, tier: str, nbytes: int, now: float) -> None:
        """Count one request of *nbytes* served for *dataset* from *tier* at time *now*."""
        ring = self._rings.get((dataset, tier))
        if ring is None:
            ring = self._rings[(dataset, tier)] = _Ring(self.buckets)
            self._by_name.setdefault(dataset, []).append((tier, ring))
            if dataset not in self._runs:
                self._runs[dataset] = _Run()
        ring.total_bytes += nbytes
        ring.total_reqs += 1
        idx = int(now // self.width)
        slot = idx % self.buckets
        tag = ring.tags[slot]
        if tag == idx:
            ring.nbytes[slot] += nbytes
            ring.nreqs[slot] += 1
        elif tag < idx:
            ring.tags[slot] = idx
            ring.nbytes[slot] = nbytes
            ring.nreqs[slot] = 1
            if idx > ring.last:
                ring.last = idx
        # tag > idx: the slot holds newer data; a request this old is outside the window.

    # -- reading ---------------------------------------------------------------------------

    def datasets(self) -> set[str]:
        return {d for d, _ in self._rings}

    def forget(self, dataset: str) -> None:
        """Drop every counter of *dataset* (its image went away)."""
        for key in [k for k in self._rings if k[0] == dataset]:
            del self._rings[key]
        self._by_name.pop(dataset, None)
        self._runs.pop(dataset, None)

    def retain(self, datasets: Iterable[str]) -> None:
        """Forget every dataset not in *datasets*."""
        keep = set(datasets)
        for key in [k for k in self._rings if k[0] not in keep]:
            del self._rings[key]
        for name in [n for n in self._runs if n not in keep]:
            del self._runs[name]
            self._by_name.pop(name, None)

    def span(self, now: float) -> float:
        """Seconds the window covers at *now* (see the module docstring)."""
        idx = int(now // self.width)
        covered = (self.buckets - 1) * self.width + (now - idx * self.width)
        return max(min(covered, now - self.start), self.width)

    def _scan(self, ring: _Ring, idx: int) -> tuple[int, int, int, int | None]:
        """Window bytes, window requests, recent bytes and the oldest bucket with bytes."""
        lo = idx - self.buckets  # buckets lo+1 .. idx are in the window
        recent_lo = idx - self.recent_buckets
        b = r = rb = 0
        oldest: int | None = None
        for tag, nb, nr in zip(ring.tags, ring.nbytes, ring.nreqs):
            if lo < tag <= idx:
                b += nb
                r += nr
                if tag > recent_lo:
                    rb += nb
                if nb and (oldest is None or tag < oldest):
                    oldest = tag
        return b, r, rb, oldest

    def snapshot(self, now: float) -> StatsSnapshot:
        """Figures at *now*.

        Also tracks, per dataset, when its current run of activity began (``active_since``):
        the start of the oldest bucket in the window holding bytes, remembered for as long as
        every snapshot finds bytes in the window and forgotten once one finds none.  This relies
        on snapshots being taken more often than once per window, as mountd's stats loop does.
        """
        idx = int(now // self.width)
        span = self.span(now)
        into = now - idx * self.width
        recent_span = max(min((self.recent_buckets - 1) * self.width + into, now - self.start), self.width)
        out: dict[str, DatasetStats] = {}
        stale = idx - self.buckets  # a ring whose newest bucket is this old has nothing in the window
        for name, rings in self._by_name.items():
            run = self._runs[name]
            if run.since is None and all(r.last <= stale for _, r in rings):
                cached = run.idle
                if cached is not None and cached.total_requests == sum(r.total_reqs for _, r in rings):
                    out[name] = cached
                    continue
            tiers: dict[str, TierStats] = {}
            wb = rb = total = reqs = 0
            first: int | None = None
            newest = -1
            for tier, ring in rings:
                total += ring.total_bytes
                reqs += ring.total_reqs
                newest = max(newest, ring.last)
                if ring.last <= stale:  # nothing in the window: skip the ring scan
                    tiers[tier] = TierStats(0, 0, 0.0, ring.total_bytes, ring.total_reqs)
                    continue
                tb, tr, trb, f = self._scan(ring, idx)
                if f is not None:
                    first = f if first is None else min(first, f)
                rb += trb
                wb += tb
                tiers[tier] = TierStats(tb, tr, tb / span, ring.total_bytes, ring.total_reqs)
            if wb == 0:
                if run.since is not None:  # the run ended
                    run.ended = (newest + 1) * self.width
                    run.prev_bytes = total - run.base
                    run.runs += 1
                    run.since = None
                    run.paused = False
            elif run.since is None:
                assert first is not None
                run.since = max(first * self.width, self.start)
                run.base = total - wb
                if run.ended is not None and run.since - run.ended < RETURN_WINDOWS * self.window:
                    run.returns += 1  # the pause that ended the last run: reads came again soon
                run.ended = None
            else:  # the run goes on: in a pause, or out of one?
                quiet = newest <= idx - PAUSE_BUCKETS
                if run.paused and not quiet:
                    run.resumed += 1
                run.paused = quiet
            decay = math.exp(-max(now - run.decayed_at, 0.0) / self.tau)
            run.decayed = run.decayed * decay + (total - run.decayed_total)
            run.decayed_at, run.decayed_total = now, total
            ds = DatasetStats(
                name=name,
                tiers=tiers,
                rate=wb / span,
                recent_rate=rb / recent_span,
                active_since=run.since,
                window_bytes=wb,
                total_bytes=total,
                total_requests=reqs,
                run_bytes=total - run.base if run.since is not None else 0,
                last_run_bytes=run.prev_bytes,
                runs=run.runs,
                resumed=run.resumed,
                returns=run.returns,
                last_read=min((newest + 1) * self.width, now) if newest >= 0 else None,
                long_bytes=run.decayed,
                long_at=run.decayed_at,
            )
            run.idle = ds if wb == 0 else None
            out[name] = ds
        return StatsSnapshot(now=now, window=self.window, span=span, resolution=self.width, datasets=out, tau=self.tau)
