"""The trace simulator's model: the cache and its serial copier, the policies replayed (ours,
LRU, scratch_manager's, an offline oracle) and the replay itself.  What each does, and the
targets, are described in ``simulate_traces.py`` (the command line)."""

from __future__ import annotations

import bisect
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mountd.config import MountdConfig  # noqa: E402
from scratchfs.policy import (  # noqa: E402
    PolicyParams,
    best_subset,
    choose,
    copied_back,
    demand_from_snapshot,
    gives_way,
)
from scratchfs.stats import BUCKETS, CACHE, SCRATCH, ThroughputStats  # noqa: E402
from scratchfs.trace import Event, Trace  # noqa: E402
from scratchfs.units import format_size  # noqa: E402

MiB = 1 << 20


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    capacity: int
    copy_bandwidth: float = 500 * MiB  # bytes/s, 0 = instant
    window: float = MountdConfig.window  # mountd's defaults, here and below
    interval: float = MountdConfig.policy_interval  # policy round
    min_residency: float = MountdConfig.min_residency
    hysteresis: float = PolicyParams.hysteresis  # mountd's
    oracle_horizons: tuple[float, ...] = (1.0, 3.0, 9.0)  # × window


# -- the cache and its copier -----------------------------------------------------------------


#: A dataset promoted again within this many seconds of its demotion counts as a flap.
FLAP_SECONDS = 10.0


class CacheModel:
    """Images held or being copied, one serial copier at a fixed bandwidth.

    With ``keep`` (mountd's behaviour), a demoted image's copy stays on the disk, reclaimable,
    until the copy running needs its space (oldest left first): promoted again before that, it
    is served at once, with nothing copied.  So does what a cancelled copy wrote: the next copy
    of that image goes on from it.
    """

    def __init__(self, sizes: dict[str, int], bandwidth: float, capacity: int = 0, keep: bool = False) -> None:
        self.sizes = sizes
        self.bw = bandwidth
        self.capacity = capacity
        self.keep = keep
        self.kept: OrderedDict[str, int] = OrderedDict()  # name → bytes left on the disk, oldest first
        self.partial: set[str] = set()  # ... of those, cancelled copies (the rest: whole copies)
        self.ready: dict[str, float] = {}  # name → time promoted (copy queued)
        self.queue: OrderedDict[str, float] = OrderedDict()  # name → time promoted
        self.head_start = 0.0  # when the copy at the head of the queue started
        self.head_done = 0  # bytes of it on the disk then (going on from a cancelled copy)
        self.used = 0
        self.peak = 0
        self.bytes_copied = 0
        self.copies = 0
        self.drops = 0
        self.dropped_at: dict[str, float] = {}  # name → when it was last demoted
        self.flaps = 0  # promotions of a dataset within FLAP_SECONDS of its demotion

    @property
    def reclaimable(self) -> list[str]:
        """Demoted images whose whole copy is still on the disk."""
        return [n for n in self.kept if n not in self.partial]

    def held(self) -> dict[str, float]:
        return {**self.ready, **self.queue}

    def __contains__(self, name: str) -> bool:
        return name in self.ready or name in self.queue

    def busy_until(self, now: float) -> float:
        """When the copier would be free, given the queue as it stands."""
        if not self.queue:
            return now
        t = self.head_start - self.head_done / self.bw
        for name in self.queue:
            t += self.sizes[name] / self.bw
        return max(t, now)

    def next_done(self) -> float:
        """When the copy at the head of the queue ends (inf: none running)."""
        if not self.queue:
            return math.inf
        return self.head_start + (self.sizes[next(iter(self.queue))] - self.head_done) / self.bw

    def _start_head(self, now: float) -> None:
        """The copy at the head of the queue starts now, from a cancelled copy if one is left."""
        self.head_start, self.head_done = now, 0
        head = next(iter(self.queue), None)
        if head in self.partial:
            self.partial.discard(head)
            self.head_done = self.kept.pop(head)

    def advance(self, now: float) -> None:
        while self.queue:
            done = self.next_done()
            if done > now:
                break
            name = next(iter(self.queue))
            self.ready[name] = self.queue.pop(name)
            self.bytes_copied += self.sizes[name] - self.head_done
            self._start_head(done)
        self._reclaim(now)

    def _reclaim(self, now: float) -> None:
        """Drop what is kept, oldest first, while the bytes on the disk (held copies, the
        running copy so far, what is kept) exceed the capacity."""
        if not self.kept:
            return
        on_disk = sum(self.sizes[n] for n in self.ready) + sum(self.kept.values()) + self.copied(now)
        while self.kept and on_disk > self.capacity:
            name, nbytes = self.kept.popitem(last=False)
            self.partial.discard(name)
            on_disk -= nbytes

    def promote(self, name: str, now: float) -> None:
        if name in self:
            return
        if now - self.dropped_at.get(name, -math.inf) <= FLAP_SECONDS:
            self.flaps += 1
        size = self.sizes[name]
        self.used += size
        self.peak = max(self.peak, self.used)
        if name in self.kept and name not in self.partial:
            del self.kept[name]
            self.ready[name] = now  # its copy is still on the disk
            return
        self.copies += 1
        if self.bw <= 0:
            self.ready[name] = now
            self.bytes_copied += size
        else:
            self.queue[name] = now
            if len(self.queue) == 1:
                self._start_head(now)
        self._reclaim(now)

    def copied(self, now: float) -> int:
        """Bytes the copy at the head of the queue has on the disk by *now* (0: none running)."""
        if not self.queue:
            return 0
        return int(min(self.sizes[next(iter(self.queue))], self.head_done + (now - self.head_start) * self.bw))

    def demote(self, name: str, now: float) -> None:
        if name in self.ready:
            del self.ready[name]
            if self.keep:
                self.kept[name] = self.sizes[name]
        elif name in self.queue:
            if next(iter(self.queue)) == name:
                done = self.copied(now)
                self.bytes_copied += done - self.head_done
                del self.queue[name]
                if self.keep and done > 0:
                    self.kept[name] = done
                    self.partial.add(name)
                self._start_head(now)
            else:
                del self.queue[name]
        else:
            return
        self.used -= self.sizes[name]
        self.drops += 1
        self.dropped_at[name] = now


# -- policies ---------------------------------------------------------------------------------


class SimPolicy:
    """A policy under simulation: sees every read, and gets a round every interval."""

    name = "?"
    keeps_copies = False  # demoted copies stay until their space is needed (CacheModel's keep)

    def __init__(self, trace: Trace, cfg: SimConfig) -> None:
        self.trace = trace
        self.cfg = cfg
        self.cache = CacheModel(trace.sizes, cfg.copy_bandwidth, cfg.capacity, keep=self.keeps_copies)

    def on_read(self, ev: Event, hit: bool) -> None:
        pass

    def round(self, now: float) -> None:
        pass

    def on_copy_done(self, now: float) -> None:
        pass

    def drop_unwanted(self, want: Collection[str], now: float) -> None:
        for name in list(self.cache.held()):
            if name not in want:
                self.cache.demote(name, now)

    def apply(self, target: Sequence[str], now: float, order: Callable[[str], float] | None = None) -> None:
        self.drop_unwanted(set(target), now)
        new = [n for n in target if n not in self.cache]
        if order is not None:
            new.sort(key=order)
        for name in new:
            self.cache.promote(name, now)


class OursPolicy(SimPolicy):
    name = "ours"
    keeps_copies = True  # as mountd

    def __init__(self, trace: Trace, cfg: SimConfig) -> None:
        super().__init__(trace, cfg)
        self.stats = ThroughputStats(cfg.window, buckets=BUCKETS)
        self.params = PolicyParams.for_window(
            cfg.window,
            min_residency=cfg.min_residency,
            copy_bandwidth=cfg.copy_bandwidth,
            hysteresis=cfg.hysteresis,
        )
        self.last_scratch_read: dict[str, float] = {}
        self.demoted_at: dict[str, float] = {}  # as mountd: when each was last demoted ...
        self.recopied: dict[str, int] = {}  # ... and how often copied back soon after
        # image bytes per served byte, where the trace knows the logical size
        self.scale = {n: trace.sizes[n] / v for n, v in trace.logical_sizes.items() if n in trace.sizes and v > 0}

    def on_read(self, ev: Event, hit: bool) -> None:
        self.stats.record(ev.dataset, CACHE if hit else SCRATCH, ev.nbytes, ev.t)
        # As mountd: a dataset on scratch that starts being read wakes the policy at once.
        if not hit:
            last = self.last_scratch_read.get(ev.dataset)
            self.last_scratch_read[ev.dataset] = ev.t
            if last is None or ev.t - last > self.cfg.interval:
                self.round(ev.t)

    def drop_unwanted(self, want: Collection[str], now: float) -> None:
        for name in self.cache.ready:
            if name not in want:
                self.demoted_at[name] = now
        super().drop_unwanted(want, now)

    def on_copy_done(self, now: float) -> None:
        self.round(now)  # as mountd: the copier is free, the next copy starts now

    def round(self, now: float) -> None:
        snap = self.stats.snapshot(now)
        demand = demand_from_snapshot(snap, self.scale)
        kept = set(self.cache.reclaimable)
        d = choose(
            demand=demand,
            sizes=self.trace.sizes,
            capacity=self.cfg.capacity,
            free=self.cfg.capacity - self.cache.used,
            cached=self.cache.held(),
            now=now,
            params=self.params,
            reclaimable=kept,
            recopied=self.recopied,
        )
        self.drop_unwanted(d.hold, now)
        cache, sizes = self.cache, self.trace.sizes
        # As mountd: what is wanted again while its copy is still on the disk is served from it
        # at once; the rest waits for the copier.
        for name in d.queue:
            if name in kept:
                cache.promote(name, now)
        queue = [n for n in d.queue if n not in cache]
        # As mountd: the copy running gives way to the first waiting one if that serves more.
        if cache.queue and queue:
            head, first = next(iter(cache.queue)), queue[0]
            if gives_way(demand.get(head), sizes[head], cache.copied(now), demand.get(first), sizes[first], d.expected[first], cache.bw):
                cache.demote(head, now)
        # As mountd: copies in the policy's order, one at a time; what waits is decided again
        # next round.
        for name in queue:
            if cache.queue:
                break
            if copied_back(self.demoted_at.pop(name, None), now, self.cfg.window):
                self.recopied[name] = self.recopied.get(name, 0) + 1
            cache.promote(name, now)


class LruPolicy(SimPolicy):
    name = "lru"

    def __init__(self, trace: Trace, cfg: SimConfig) -> None:
        super().__init__(trace, cfg)
        self.recency: OrderedDict[str, None] = OrderedDict()

    def on_read(self, ev: Event, hit: bool) -> None:
        name = ev.dataset
        self.recency[name] = None
        self.recency.move_to_end(name)
        if name in self.cache:
            return
        size = self.trace.sizes[name]
        if size > self.cfg.capacity:
            return
        for victim in list(self.recency):
            if self.cache.used + size <= self.cfg.capacity:
                break
            if victim != name and victim in self.cache:
                self.cache.demote(victim, ev.t)
        self.cache.promote(name, ev.t)


class ScratchManagerPolicy(SimPolicy):
    name = "scratch_manager"
    round_up = False  # its weights are floored, so what it holds can exceed the capacity

    def __init__(self, trace: Trace, cfg: SimConfig) -> None:
        super().__init__(trace, cfg)
        self.stats = ThroughputStats(cfg.window, buckets=BUCKETS)
        self.order: dict[str, int] = {n: i for i, n in enumerate(trace.sizes)}

    def on_read(self, ev: Event, hit: bool) -> None:
        self.stats.record(ev.dataset, CACHE if hit else SCRATCH, ev.nbytes, ev.t)

    def round(self, now: float) -> None:
        snap = self.stats.snapshot(now)
        divisor = max(snap.span, self.cfg.window / 2)
        held = self.cache.held()
        values: dict[str, float] = {}
        for name in self.trace.sizes:
            d = snap.datasets.get(name)
            v = (d.window_bytes / divisor) if d else 0.0
            if name in held:
                v += MiB
            if v > 0:
                values[name] = v
        names = sorted(values, key=self.order.__getitem__)
        picks = _floor_knapsack(names, [values[n] for n in names], self.trace.sizes, self.cfg.capacity, self.round_up)
        self.apply(picks, now)


class ScratchManagerExactPolicy(ScratchManagerPolicy):
    """scratch_manager's policy with its weights rounded up instead: never above the capacity.
    Not the policy the targets compare with (that is scratch_manager's as its code is); shown
    with ``--exact-scratch-manager`` to tell what its overshoot is worth."""

    name = "sm_exact"
    round_up = True


def _floor_knapsack(names: list[str], values: list[float], sizes: dict[str, int], capacity: int,
                    round_up: bool = False) -> list[str]:  # fmt: skip
    """0/1 knapsack over weights floored to 1000 units of the capacity (scratch_manager's;
    with *round_up*, rounded up instead).

    The same table as its dynamic programme (an item is taken only if strictly better), one
    row per item; each row is one vector operation (the same float additions and maxima as a
    cell-by-cell loop, so the picks are identical).
    """
    cap = 1000
    weights = [-(-sizes[n] * cap // capacity) if round_up else sizes[n] * cap // capacity for n in names]
    rows = np.zeros((len(names) + 1, cap + 1))
    for i, (v, w) in enumerate(zip(values, weights), 1):
        best, row = rows[i - 1], rows[i]
        row[:] = best
        if w <= cap:
            np.maximum(best[w:], best[: cap + 1 - w] + v, out=row[w:])
    out, c = [], cap
    for i in range(len(names), 0, -1):
        if rows[i, c] != rows[i - 1, c]:
            out.append(names[i - 1])
            c -= weights[i - 1]
    return out


class FutureDemand:
    """Exact future bytes per image from the trace (what the oracle is allowed to know)."""

    def __init__(self, trace: Trace) -> None:
        self.times: dict[str, list[float]] = {}
        self.cum: dict[str, list[int]] = {}
        for ev in trace.events:
            ts = self.times.setdefault(ev.dataset, [])
            cs = self.cum.setdefault(ev.dataset, [])
            ts.append(ev.t)
            cs.append((cs[-1] if cs else 0) + ev.nbytes)
        self.events = trace.events
        self.event_times = [e.t for e in trace.events]

    def between(self, name: str, t0: float, t1: float) -> int:
        """Bytes read of *name* at times in [t0, t1)."""
        ts, cs = self.times[name], self.cum[name]
        i = bisect.bisect_left(ts, t0)
        j = bisect.bisect_left(ts, t1)
        if j <= i:
            return 0
        return cs[j - 1] - (cs[i - 1] if i else 0)


class OraclePolicy(SimPolicy):
    name = "oracle"

    def __init__(self, trace: Trace, cfg: SimConfig, horizon: float, future: FutureDemand) -> None:
        super().__init__(trace, cfg)
        self.horizon = horizon
        self.future = future
        # sliding count of reads per image in [now, now + horizon)
        self.active: dict[str, int] = {}
        self.lo = self.hi = 0

    def round(self, now: float) -> None:
        f = self.future
        end = now + self.horizon
        while self.hi < len(f.events) and f.event_times[self.hi] < end:
            n = f.events[self.hi].dataset
            self.active[n] = self.active.get(n, 0) + 1
            self.hi += 1
        while self.lo < self.hi and f.event_times[self.lo] < now:
            n = f.events[self.lo].dataset
            self.active[n] -= 1
            if not self.active[n]:
                del self.active[n]
            self.lo += 1
        sizes = self.trace.sizes
        held = self.cache.held()
        backlog = self.cache.busy_until(now)
        bw = self.cfg.copy_bandwidth
        items = []
        for name in self.active:
            size = sizes[name]
            if name in held:
                ready_at = now if name in self.cache.ready else backlog
                value = float(f.between(name, ready_at, end))
            else:
                ready_at = backlog + (size / bw if bw > 0 else 0.0)
                value = float(f.between(name, ready_at, end) - size)
            if value > 0:
                items.append((name, size, value))
        values = {n: v for n, _, v in items}
        target = best_subset(items, self.cfg.capacity)
        left = self.cfg.capacity - sum(sizes[n] for n in target)
        for name in sorted(held, key=lambda n: -held[n]):  # idle cached images stay while room
            if name not in target and name not in values and sizes[name] <= left:
                target.append(name)
                left -= sizes[name]
        self.apply(target, now, order=lambda n: -values.get(n, 0.0) / max(sizes[n], 1))


# -- replay -----------------------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    hit_bytes: int = 0
    total_bytes: int = 0
    bytes_copied: int = 0
    copies: int = 0
    drops: int = 0
    flaps: int = 0  # promotions within FLAP_SECONDS of the same dataset's demotion
    peak: int = 0
    capacity: int = 0
    note: str = ""

    @property
    def hit_ratio(self) -> float:
        return self.hit_bytes / self.total_bytes if self.total_bytes else 0.0


def replay(trace: Trace, policy: SimPolicy) -> Result:
    cfg = policy.cfg
    cache = policy.cache
    res = Result(policy.name, capacity=cfg.capacity)
    next_round = 0.0
    for ev in trace.events:
        while True:
            done = cache.next_done()
            if min(done, next_round) > ev.t:
                break
            if done < next_round:  # a copy ends before the next round: the policy may hear of it
                cache.advance(done)
                policy.on_copy_done(done)
            else:
                cache.advance(next_round)
                policy.round(next_round)
                next_round += cfg.interval
        cache.advance(ev.t)
        hit = ev.dataset in cache.ready
        if hit:
            res.hit_bytes += ev.nbytes
        res.total_bytes += ev.nbytes
        policy.on_read(ev, hit)
    cache.advance(math.inf)
    res.bytes_copied = cache.bytes_copied
    res.copies = cache.copies
    res.drops = cache.drops
    res.flaps = cache.flaps
    res.peak = cache.peak
    return res


def spread(trace: Trace, piece: float) -> Trace:
    """The trace with each event of a sampled trace (``trace.interval``: each event aggregates
    the reads of that many seconds before it, as mountd's recorder writes them) split into
    equal parts over that time, none longer than ``piece`` (a stats bucket).  mountd's counters
    saw those reads as they came; replayed in one lump per sampling interval, a dataset read
    all the time would look idle in every other bucket when the buckets are shorter than the
    interval.  Bytes and order of datasets are kept; other traces are returned as they are."""
    interval = trace.interval
    if interval is None or interval <= piece:
        return trace
    parts = math.ceil(interval / piece)
    step = interval / parts
    events: list[Event] = []
    for e in trace.events:
        share, rest = divmod(e.nbytes, parts)
        for k in range(parts):
            t = max(e.t - interval + (k + 1) * step, 0.0)
            events.append(Event(t, e.dataset, share + (rest if k == parts - 1 else 0)))
    events.sort(key=lambda e: e.t)  # stable: each event's parts stay in order
    return Trace(trace.sizes, events, trace.meta, trace.logical_sizes, interval=step)


def run_all(trace: Trace, cfg: SimConfig, exact_sm: bool = False) -> list[Result]:
    trace = spread(trace, cfg.window / BUCKETS)
    results = [
        replay(trace, OursPolicy(trace, cfg)),
        replay(trace, LruPolicy(trace, cfg)),
        replay(trace, ScratchManagerPolicy(trace, cfg)),
    ]
    if exact_sm:
        results.append(replay(trace, ScratchManagerExactPolicy(trace, cfg)))
    future = FutureDemand(trace)
    best: Result | None = None
    for mult in cfg.oracle_horizons:
        r = replay(trace, OraclePolicy(trace, cfg, mult * cfg.window, future))
        r.note = f"H={mult:g}×window"
        if best is None or r.hit_ratio > best.hit_ratio:
            best = r
    assert best is not None
    results.append(best)
    return results


def check_targets(results: Sequence[Result]) -> tuple[bool, list[str]]:
    by = {r.policy: r for r in results}
    ours, lru, sm, opt = by["ours"], by["lru"], by["scratch_manager"], by["oracle"]
    eps = 1e-9
    checks = [
        (ours.hit_ratio + eps >= lru.hit_ratio, f"hit ≥ lru ({ours.hit_ratio:.3f} vs {lru.hit_ratio:.3f})"),
        (ours.hit_ratio + eps >= sm.hit_ratio, f"hit ≥ scratch_manager ({ours.hit_ratio:.3f} vs {sm.hit_ratio:.3f})"),
        (
            ours.hit_ratio + eps >= 0.9 * opt.hit_ratio,
            f"hit ≥ 0.9×oracle ({ours.hit_ratio:.3f} vs {0.9 * opt.hit_ratio:.3f})",
        ),
        (
            ours.bytes_copied <= sm.bytes_copied,
            f"copied ≤ scratch_manager ({format_size(ours.bytes_copied)} vs {format_size(sm.bytes_copied)})",
        ),
    ]
    failed = [text for ok, text in checks if not ok]
    return not failed, failed
