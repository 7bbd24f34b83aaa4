#!/usr/bin/env python3
"""Replay read traces through promotion policies and compare byte hit ratio and bytes copied.

Policies, all replayed against the same trace, cache capacity and copy model:

* ``ours``  — :func:`scratchfs.policy.choose` fed by :class:`scratchfs.stats.ThroughputStats`,
  run every ``--interval`` seconds (default 2 s, mountd's default ``policy_interval``; the
  round-based baselines below use the same rounds), as mountd runs it.  A recorded trace
  with logical sizes (``Trace.logical_sizes``: dataset → bytes of its files, uncompressed, as
  mountd records them from the images' manifests) gets its served bytes scaled to image bytes
  by image size / logical size (see :func:`scratchfs.policy.demand_from_snapshot`), as mountd
  does; datasets without one count served bytes as image bytes.  Copies start as mountd starts
  them: one at a time, in value-per-byte order; a dataset still waiting is not cached and is
  decided again at the next round (so a copy whose reason went away is never started); the
  copy running is cancelled when the first one waiting serves more (see
  :func:`scratchfs.policy.gives_way`), its bytes copied so far counted as copied.
* ``lru``   — whole-image LRU: a read of an image that is not cached starts its copy, evicting
  the least recently read images until it fits.
* ``scratch_manager`` — the policy of CEA-LIST's scratch_manager as its README and code describe
  it, re-implemented from that description: every round, per image, the throughput over the
  window (both tiers together; divided by the time covered but at least half the window) plus
  1 MiB/s if the image is cached; a 0/1 knapsack over those values with each size floored to
  ``size * 1000 // capacity`` units of a 1000-unit capacity; the picked images are held, the
  others dropped.  The floor can overshoot the capacity; it is not corrected here (the
  ``peak`` column shows it).  Its own loop blocks while copying; here it gets the same
  background copier as everyone else, which can only help it.
* ``oracle`` — an offline, clairvoyant baseline (not a proven optimum).  Every round it knows
  the exact bytes each image will be read during the next H seconds and holds the set that
  maximises *(bytes it would serve from the cache in those H seconds, counting only reads after
  each new copy would finish) − (bytes it would have to copy)*, within the capacity (exact-byte
  knapsack), keeping idle cached images while space allows.  It uses the same copier.  It is
  run for several H (multiples of the window) and the one with the highest hit ratio is
  reported.  Its objective, like ours' admission, counts copy traffic as a cost; a policy that
  ignores copy traffic can score a higher hit ratio than it by copying much more (LRU does,
  and so does ours where it lends spare space: see ``cold``).

Copy model (all policies): one copier, serial, at ``--copy-bandwidth`` bytes/s (0 = instant).
A promoted image takes ``size / bandwidth`` seconds after the copies queued before it; reads of
it go to scratch until its copy has finished.  Space is taken when a copy is queued.  Dropping
an image frees its space at once; a copy dropped mid-way counts the bytes it had copied.
"Bytes copied" is what the copier read from scratch.

Byte hit ratio: bytes of trace reads served from the cache / all bytes of trace reads.

Targets (issue 4), checked per trace: ours ≥ lru, ours ≥ scratch_manager, ours ≥ 0.9 × oracle,
bytes copied by ours ≤ scratch_manager's.

Trace shapes (seeded: ``--seed``, or ``--seeds 0-38`` for each shape at every seed, with one
line per trace and per shape the traces passing; ``--scale`` shrinks them for quick runs):

* ``hot``     — 24 images, Zipf-like popularity; jobs arrive at random and read one image at
  100–400 MiB/s for 10–60 minutes; the popular set never changes.
* ``shift``   — like ``hot`` but the popularity ranking is re-drawn every 90 minutes.
* ``cold``    — 4 images of 50 GiB read by a steady stream of jobs, plus 1500 small images
  (0.5–8 GiB) each read by one to three short jobs reading 10–50 % of it, at random times.
* ``scan``    — a steady hot set of 5 images, and every 2 hours a job scanning 40 large images
  once each, end to end.

Recorded traces (``--trace FILE``, the format of :mod:`scratchfs.trace`, as mountd's
``--record-trace`` writes it) are replayed the same way.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import logging
import math
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchfs.errors import ScratchfsError  # noqa: E402
from scratchfs.policy import (  # noqa: E402
    HORIZON_WINDOWS,
    PolicyParams,
    best_subset,
    choose,
    demand_from_snapshot,
    gives_way,
)
from scratchfs.stats import CACHE, SCRATCH, ThroughputStats  # noqa: E402
from scratchfs.trace import Event, Trace, read_trace, write_trace  # noqa: E402
from scratchfs.units import format_size, parse_duration, parse_size  # noqa: E402

log = logging.getLogger("simulate_traces")

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    capacity: int
    copy_bandwidth: float = 500 * MiB  # bytes/s, 0 = instant
    window: float = 600.0
    interval: float = 2.0  # policy round (mountd's default policy_interval)
    min_residency: float = 600.0
    hysteresis: float = PolicyParams.hysteresis  # mountd's
    oracle_horizons: tuple[float, ...] = (1.0, 3.0, 9.0)  # × window


# -- the cache and its copier -----------------------------------------------------------------


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
        self.stats = ThroughputStats(cfg.window, buckets=60)
        self.params = PolicyParams(
            horizon=HORIZON_WINDOWS * cfg.window,
            min_residency=cfg.min_residency,
            copy_bandwidth=cfg.copy_bandwidth,
            hysteresis=cfg.hysteresis,
        )
        self.last_scratch_read: dict[str, float] = {}
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
        self.stats = ThroughputStats(cfg.window, buckets=60)
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
    res.peak = cache.peak
    return res


def run_all(trace: Trace, cfg: SimConfig, exact_sm: bool = False) -> list[Result]:
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


# -- synthetic traces -------------------------------------------------------------------------


@dataclass
class Shape:
    name: str
    trace: Trace
    capacity: int
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _jobs_to_events(jobs: list[tuple[float, str, float, float]], tick: float, rng: random.Random) -> list[Event]:
    """Jobs (start, image, rate bytes/s, duration s) → one event per job per tick."""
    heap: list[tuple[float, int, str, float, float]] = []
    for i, (start, name, rate, dur) in enumerate(jobs):
        heap.append((start, i, name, rate, start + dur))
    heapq.heapify(heap)
    events = []
    while heap:
        t, i, name, rate, end = heapq.heappop(heap)
        step = min(tick, end - t)
        if step <= 0:
            continue
        nbytes = int(rate * step * rng.uniform(0.8, 1.2))
        if nbytes > 0:
            events.append(Event(round(t, 3), name, nbytes))
        if t + step < end:
            heapq.heappush(heap, (t + step, i, name, rate, end))
    events.sort(key=lambda e: e.t)
    return events


def _poisson_jobs(
    rng: random.Random,
    duration: float,
    mean_gap: float,
    pick: Callable[[float], str],
    rate: tuple[float, float],
    length: tuple[float, float],
) -> list[tuple[float, str, float, float]]:
    jobs: list[tuple[float, str, float, float]] = []
    t = 0.0
    while True:
        t += rng.expovariate(1 / mean_gap)
        if t >= duration:
            return jobs
        jobs.append((t, pick(t), rng.uniform(*rate), rng.uniform(*length)))


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def shape_hot(rng: random.Random, scale: float, shift: bool = False) -> Shape:
    n = 24
    names = [f"ds{i:02d}" for i in range(n)]
    sizes = {nm: int(math.exp(rng.uniform(math.log(20), math.log(300))) * GiB * scale) for nm in names}
    duration = 6 * 3600 * max(scale, 0.05)
    phase = 90 * 60 * max(scale, 0.05)
    weights = _zipf_weights(n)
    perms: list[list[str]] = []

    def pick(t: float) -> str:
        k = int(t // phase) if shift else 0
        while len(perms) <= k:
            p = names[:]
            rng.shuffle(p)
            perms.append(p)
        return rng.choices(perms[k], weights)[0]

    jobs = _poisson_jobs(rng, duration, 120 * max(scale, 0.05), pick, (100 * MiB, 400 * MiB), (600 * scale, 3600 * scale))
    events = _jobs_to_events(jobs, 5.0, rng)
    capacity = int(sum(sizes.values()) * 0.35)
    return Shape("shift" if shift else "hot", Trace(sizes, events), capacity)


def shape_cold(rng: random.Random, scale: float) -> Shape:
    sizes: dict[str, int] = {}
    hot = [f"hot{i}" for i in range(4)]
    for nm in hot:
        sizes[nm] = int(50 * GiB * scale)
    n_small = max(20, int(1500 * scale))
    small = [f"small{i:04d}" for i in range(n_small)]
    for nm in small:
        sizes[nm] = int(math.exp(rng.uniform(math.log(0.5), math.log(8))) * GiB)
    duration = 6 * 3600 * max(scale, 0.05)
    jobs = _poisson_jobs(rng, duration, 1800 * max(scale, 0.05), lambda t: rng.choice(hot), (50 * MiB, 150 * MiB), (1800 * scale, 3600 * scale))
    for nm in small:
        for _ in range(rng.choice((1, 1, 2, 3))):
            frac = rng.uniform(0.1, 0.5)
            rate = rng.uniform(50 * MiB, 200 * MiB)
            jobs.append((rng.uniform(0, duration), nm, rate, sizes[nm] * frac / rate))
    events = _jobs_to_events(jobs, 5.0, rng)
    capacity = int(sum(sizes[h] for h in hot) + sum(sizes[s] for s in small) * 0.1)
    return Shape("cold", Trace(sizes, events), capacity)


def shape_scan(rng: random.Random, scale: float) -> Shape:
    sizes: dict[str, int] = {}
    hot = [f"hot{i}" for i in range(5)]
    for nm in hot:
        sizes[nm] = int(rng.uniform(30, 120) * GiB * scale)
    big = [f"scan{i:02d}" for i in range(40)]
    for nm in big:
        sizes[nm] = int(rng.uniform(40, 200) * GiB * scale)
    duration = 6 * 3600 * max(scale, 0.05)
    jobs = _poisson_jobs(rng, duration, 240 * max(scale, 0.05), lambda t: rng.choices(hot, _zipf_weights(5))[0], (100 * MiB, 300 * MiB), (1200 * scale, 3600 * scale))
    scan_rate = 800 * MiB
    t = 600.0 * max(scale, 0.05)
    while t < duration:
        for nm in big:
            dur = sizes[nm] / scan_rate
            jobs.append((t, nm, scan_rate, dur))
            t += dur
        t += 2 * 3600 * max(scale, 0.05)
    events = [e for e in _jobs_to_events(jobs, 5.0, rng) if e.t < duration]
    capacity = int(sum(sizes[h] for h in hot) * 1.5)
    return Shape("scan", Trace(sizes, events), capacity)


SHAPES: dict[str, Callable[[random.Random, float], Shape]] = {
    "hot": lambda rng, scale: shape_hot(rng, scale),
    "shift": lambda rng, scale: shape_hot(rng, scale, shift=True),
    "cold": shape_cold,
    "scan": shape_scan,
}


# -- command line -----------------------------------------------------------------------------


def _fmt_row(trace: str, r: Result) -> str:
    return (
        f"{trace:<10} {r.policy:<16} {r.hit_ratio:>7.3f} {format_size(r.bytes_copied):>11} {r.copies:>6} "
        f"{r.peak / r.capacity if r.capacity else 0:>6.3f}  {r.note}"
    )


def parse_seeds(text: str) -> list[int]:
    """``"4"``, ``"0-12"`` or ``"0-12,20,30-31"`` → the seeds, in order, without repeats."""
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ScratchfsError(f"bad seed list {text!r} (want e.g. 4, 0-12 or 0-12,20)") from None
        if first < 0 or last < first:
            raise ScratchfsError(f"bad seed range {part.strip()!r} in {text!r}")
        out.extend(n for n in range(first, last + 1) if n not in out)
    return out


@dataclass(frozen=True)
class Job:
    """One trace to replay: a synthetic shape at a seed, or a recorded trace file."""

    label: str
    shape: str = ""
    seed: int = 0
    scale: float = 1.0
    path: Path | None = None
    capacity: int | None = None  # recorded traces: None = 35 % of their total image size
    save: Path | None = None  # synthetic traces: write it there
    exact_sm: bool = False  # also replay ScratchManagerExactPolicy


def run_job(job: Job, settings: dict[str, Any]) -> dict[str, Any]:
    """Build or read the trace of *job*, replay it through every policy; a JSON-able record."""
    t0 = time.monotonic()
    if job.path is not None:
        tr = read_trace(job.path)
        cap = job.capacity if job.capacity is not None else int(sum(tr.sizes.values()) * 0.35)
    else:
        sh = SHAPES[job.shape](random.Random(f"{job.seed}:{job.shape}"), job.scale)
        tr, cap = sh.trace, sh.capacity
        if job.save is not None:
            write_trace(job.save, tr)
    cfg = SimConfig(capacity=cap, **settings)
    log.info("%s: %d reads, %d images, %s read, capacity %s", job.label, len(tr.events), len(tr.sizes), format_size(tr.total_bytes), format_size(cap))
    results = run_all(tr, cfg, job.exact_sm)
    ok, failed = check_targets(results)
    log.info("%s: simulated in %.1fs", job.label, time.monotonic() - t0)
    return {
        "trace": job.label,
        "shape": job.shape or None,
        "seed": job.seed if job.path is None else None,
        "capacity": cap,
        "images": len(tr.sizes),
        "reads": len(tr.events),
        "results": [{**asdict(r), "hit_ratio": r.hit_ratio} for r in results],
        "pass": ok,
        "failed": failed,
    }


def _brief(rec: dict[str, Any]) -> str:
    """One line per trace: hit ratios of all four policies, ours' copies relative to scratch_manager's."""
    by = {r["policy"]: r for r in rec["results"]}
    ours, sm = by["ours"], by["scratch_manager"]
    copied = ours["bytes_copied"] / sm["bytes_copied"] if sm["bytes_copied"] else math.inf
    verdict = "PASS" if rec["pass"] else "FAIL: " + "; ".join(rec["failed"])
    if exact := by.get("sm_exact"):
        verdict += f"  (sm_exact {exact['hit_ratio']:.3f}, copied/it {ours['bytes_copied'] / max(exact['bytes_copied'], 1):.2f})"
    return (
        f"{rec['trace']:<10} {ours['hit_ratio']:>7.3f} {by['lru']['hit_ratio']:>7.3f} {sm['hit_ratio']:>7.3f} "
        f"{by['oracle']['hit_ratio']:>7.3f} {copied:>9.2f}  {verdict}"
    )


def _shape_summary(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per shape, over its seeds: traces passing, and ours' margin over scratch_manager."""
    lines = []
    for shape in dict.fromkeys(str(r["shape"]) for r in records if r["shape"]):
        recs = [r for r in records if r["shape"] == shape]
        margins = []
        for r in recs:
            by = {x["policy"]: x for x in r["results"]}
            margins.append(by["ours"]["hit_ratio"] - by["scratch_manager"]["hit_ratio"])
        worst = min(range(len(recs)), key=margins.__getitem__)
        lines.append(
            f"{shape:<6} {sum(bool(r['pass']) for r in recs)}/{len(recs)} pass; hit − scratch_manager's: "
            f"mean {sum(margins) / len(margins):+.4f}, lowest {margins[worst]:+.4f} (seed {recs[worst]['seed']})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--shapes", default=",".join(SHAPES), help="synthetic trace shapes to run (comma list, or '' for none)")
    p.add_argument("--trace", action="append", default=[], type=Path, help="a recorded trace file (repeatable)")
    p.add_argument("--capacity", help="cache capacity for recorded traces (default: 35%% of their total image size)")
    p.add_argument("--copy-bandwidth", default="500M", help="copier bandwidth, bytes/s (0 = instant) [500M]")
    p.add_argument("--window", default="10m", help="throughput window [10m]")
    p.add_argument("--interval", default="2s", help="policy round (mountd's default policy_interval) [2s]")
    p.add_argument("--min-residency", default="10m", help="[10m]")
    p.add_argument("--scale", type=float, default=1.0, help="shrink synthetic traces (sizes, durations) by this factor")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--seeds",
        help="run every shape at each of these seeds (e.g. 0-38 or 0-12,20): one line per trace, "
        "then per shape the traces passing and ours' margin over scratch_manager's hit ratio",
    )
    p.add_argument("--jobs", type=int, default=1, help="traces replayed at once, in separate processes [1]")
    p.add_argument("--save-traces", type=Path, help="write the synthetic traces into this directory")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument(
        "--exact-scratch-manager",
        action="store_true",
        help="also replay scratch_manager's policy with its size buckets rounded up (never above the capacity), "
        "for information: the targets still compare with scratch_manager's as it is",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    try:
        bw = float(parse_size(args.copy_bandwidth))
        window = parse_duration(args.window)
        interval = parse_duration(args.interval)
        residency = parse_duration(args.min_residency)
        if window <= 0 or interval <= 0:
            raise ScratchfsError("window and interval must be positive")
        if args.jobs < 1:
            raise ScratchfsError("--jobs must be at least 1")
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
        many = args.seeds is not None
        jobs: list[Job] = []
        for shape in [s for s in args.shapes.split(",") if s]:
            if shape not in SHAPES:
                raise ScratchfsError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
            for seed in seeds:
                label = f"{shape}#{seed}" if many else shape
                save = args.save_traces / f"{label.replace('#', '.')}.jsonl.gz" if args.save_traces else None
                jobs.append(Job(label, shape=shape, seed=seed, scale=args.scale, save=save, exact_sm=args.exact_scratch_manager))
        cap = parse_size(args.capacity) if args.capacity else None
        for path in args.trace:
            read_trace(path)  # a bad file stops the run here, with its one-line error
            jobs.append(Job(path.name, path=path, capacity=cap, exact_sm=args.exact_scratch_manager))
    except ScratchfsError as e:
        print(f"simulate_traces: error: {e}", file=sys.stderr)
        return 2

    settings = {"copy_bandwidth": bw, "window": window, "interval": interval, "min_residency": residency}
    if args.jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            records = list(pool.map(run_job, jobs, [settings] * len(jobs)))
    else:
        records = [run_job(job, settings) for job in jobs]
    all_ok = all(bool(r["pass"]) for r in records)
    if args.json:
        print(json.dumps({"config": settings, "traces": records}, indent=2))
        return 0 if all_ok else 1
    print(f"copy bandwidth {format_size(bw)}/s, window {window:g}s, round {interval:g}s, min_residency {residency:g}s")
    if many:
        print(f"{'trace':<10} {'ours':>7} {'lru':>7} {'sm':>7} {'oracle':>7} {'copied/sm':>9}  (byte hit ratios)")
        for rec in records:
            print(_brief(rec))
        for line in _shape_summary(records):
            print(line)
        return 0 if all_ok else 1
    print(f"{'trace':<10} {'policy':<16} {'hit':>7} {'copied':>11} {'copies':>6} {'peak':>6}")
    for rec in records:
        for r in rec["results"]:
            print(_fmt_row(str(rec["trace"]), Result(**{k: v for k, v in r.items() if k != "hit_ratio"})))
        print(f"{rec['trace']:<10} {'PASS' if rec['pass'] else 'FAIL: ' + '; '.join(rec['failed'])}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
