"""The trace simulator's synthetic trace shapes (``hot``, ``shift``, ``cold``, ``scan``, ``jobs``; see
``simulate_traces.py``), each a seeded generator of a :class:`scratchfs.trace.Trace` and the
cache capacity to replay it with."""

from __future__ import annotations

import heapq
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchfs.trace import Event, Trace  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


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


#: The ``jobs`` workload's image sizes, in size units (MiB for tools/bench_policy_live.py).
JOB_SIZES = (48, 64, 96, 128, 160, 192, 256, 320)


@dataclass(frozen=True)
class Job:
    """One reader of a job workload: from *start*, *dataset* read at *rate* for *length*."""

    start: float
    dataset: str
    rate: float  # bytes/s
    length: float  # a scan: until the end of the workload (its reader stops at the end of the file)
    scan: bool = False


def job_workload(rng: random.Random, names: list[str], end: float, unit: float = 1.0, rate_unit: float = MiB) -> list[Job]:
    """Datasets read as jobs on a cluster read them: each by one job at a time.

    The first three of *names* are read over and over (jobs of 40–120 time units at 8–24 rate
    units, 5–40 units apart, the first within 30), the next two now and then (15–40 long at
    8–16, 60–150 apart, the first within 20–90), the rest scanned once, end to end, at 16–32,
    starting within the first 70 % of *end*.  A time unit is *unit* seconds, a rate unit
    *rate_unit* bytes/s: tools/bench_policy_live.py runs it live in seconds and MiB/s; the
    ``jobs`` shape stretches it to the other shapes' scale.
    """

    def repeated(name: str, first: tuple[float, float], length: tuple[float, float],
                 rate: tuple[float, float], gap: tuple[float, float]) -> list[Job]:  # fmt: skip
        out: list[Job] = []
        t = rng.uniform(*first) * unit
        while t < end - 20 * unit:
            n = min(rng.uniform(*length) * unit, end - t)
            out.append(Job(t, name, rng.uniform(*rate) * rate_unit, n))
            t += n + rng.uniform(*gap) * unit
        return out

    hot, warm, scans = names[:3], names[3:5], names[5:]
    jobs: list[Job] = []
    for name in hot:
        jobs += repeated(name, first=(0, 30), length=(40, 120), rate=(8, 24), gap=(5, 40))
    for name in warm:
        jobs += repeated(name, first=(20, 90), length=(15, 40), rate=(8, 16), gap=(60, 150))
    for name in scans:
        jobs.append(Job(rng.uniform(0, end * 0.7), name, rng.uniform(16, 32) * rate_unit, end, scan=True))
    return sorted(jobs, key=lambda j: j.start)


def shape_jobs(rng: random.Random, scale: float) -> Shape:
    """tools/bench_policy_live.py's workload at the other shapes' scale: time ×20 (jobs of
    13–40 minutes, pauses of 2–13 minutes between a hot dataset's jobs), images of 20–130 GiB,
    rates ×20.8 (170–500 MiB/s), over 6 hours."""
    unit = 20.0 * max(scale, 0.05)
    size_unit = 417 * MiB * scale  # the live workload's MiB, so that copy time / job time is kept
    names = [f"ds{i}" for i in range(len(JOB_SIZES))]
    units = list(JOB_SIZES)
    rng.shuffle(units)
    sizes = {nm: int(u * size_unit) for nm, u in zip(names, units)}
    duration = 6 * 3600 * max(scale, 0.05)
    jobs = []
    for j in job_workload(rng, names, duration, unit, 20.8 * MiB):
        length = min(sizes[j.dataset] / j.rate if j.scan else j.length, duration - j.start)
        jobs.append((j.start, j.dataset, j.rate, length))
    events = _jobs_to_events(jobs, 5.0, rng)
    return Shape("jobs", Trace(sizes, events), int(sum(sizes.values()) * 0.35))


SHAPES: dict[str, Callable[[random.Random, float], Shape]] = {
    "hot": lambda rng, scale: shape_hot(rng, scale),
    "shift": lambda rng, scale: shape_hot(rng, scale, shift=True),
    "cold": shape_cold,
    "scan": shape_scan,
    "jobs": shape_jobs,
}
