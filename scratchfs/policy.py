"""The promotion policy: which datasets to hold on the node-local SSD.  Pure: no I/O, no clock.

:func:`choose` takes the measured demand, image sizes, the byte budget, pins, never-cache names,
what is cached since when, and ``now``; it returns the set to hold.  mountd runs it every round
and lets the copier converge on the answer.

Algorithm
---------
1. **Budget, in exact bytes.**  ``budget = min(capacity, bytes of the cached images + free)``
   where ``free`` is the real free space of the cache filesystem minus the reserve, measured
   this round.  Cached images (copies in progress included, counted at full size) are already
   on the disk, so they are inside ``bytes cached + free``; anything else that fills the disk
   shrinks ``free`` and hence the budget, which can force demotions.  Sizes are never rounded:
   the chosen set's total size is ``<= budget`` exactly.

2. **Eligible datasets**: known size, not in ``never_cache`` (never_cache beats a pin), and not
   larger than the budget.

3. **Forced holds**, in this order, each taken only if it still fits:
   pins (already cached ones first, then by value per byte), then cached datasets promoted less
   than ``min_residency`` ago (by value per byte).

4. **Value of the rest.**  A dataset's demand estimate is the higher of its throughput while
   active in the window (window bytes / the part of the window it has been active) and its
   throughput over the newest part of the window (so a rise is seen within a fraction of the
   window).  Demand is valued over a fixed ``horizon`` (mountd: twice the window):

   * cached (incumbent): ``value = demand * horizon * (1 + hysteresis)``
   * not cached (candidate): ``value = demand * max(horizon - size / copy_bandwidth, 0) - size``:
     the bytes it would serve from the SSD once copied (reads during the copy still go to
     scratch) minus the bytes the copy itself reads from scratch.

   **Admission (ski rental).**  A candidate is considered at all only once the demand of its
   current run has paid for its copy: with ``age`` the time it has been read without a
   window-long pause, ``demand * (age - copy_time) > admission * size`` (``admission`` = 1 by
   default: read about its own size since the run began, plus what is read while the copy
   would run).  A dataset read once, start to end, never qualifies and stays on scratch; one
   read over and over qualifies after its first pass.  This is the classic rent-or-buy rule,
   which never pays more than about twice what the best choice in hindsight pays in traffic.
   Candidates with ``value <= 0`` or a demand below ``min_rate`` are not considered either.

   Value per byte (``value / size``) ranks datasets.

5. **Knapsack** over the remaining budget: the better (by total value) of a greedy fill by value
   per byte (skipping what does not fit and going on) and a dynamic programme over the Pareto
   frontier of (exact bytes, value) states.  The frontier is exact while it has at most
   ``2 * resolution`` states; beyond that each ``budget / resolution`` band of sizes keeps only
   its best state.  Either way the sums are exact bytes: no rounding can overshoot.  The
   dynamic programme runs only while ``items * resolution`` stays small enough for a round.

6. **Keep idle incumbents** while there is room: cached datasets that lost their demand stay
   (best value per byte first) as long as nothing with value needs the space, so returning
   demand finds them still cached and nothing is copied twice.

7. **Hysteresis / no flapping.**  The same steps are run with incumbents only; the set with
   candidates replaces it only if its total value is strictly higher.  Because a candidate's
   value is at most ``demand * H`` while an incumbent's is ``demand * H * (1 + hysteresis)``,
   a change under constant demand strictly raises the held demand ``sum(demand * H)``; with
   finitely many sets, constant demand therefore converges and never cycles.  Incumbents also
   do not pay the copy cost a candidate pays, which is what keeps two datasets of similar
   demand from trading places.

Datasets not in ``sizes`` (their image went away) are never held.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import StatsSnapshot

log = logging.getLogger(__name__)

#: Above this many (items × resolution) the knapsack uses the greedy fill alone, to bound the
#: time of one policy round.
DP_CELL_LIMIT = 2_000_000


@dataclass(frozen=True)
class PolicyParams:
    """Tuning of :func:`choose`.  Times in seconds, bandwidth in bytes/s."""

    horizon: float = 1200.0  # how far ahead demand is valued (mountd: 2 × window)
    max_horizon: float = 4 * 3600.0  # cap on the age the admission test extrapolates
    admission: float = 1.0  # fraction of its size a dataset must have been read before promotion
    min_residency: float = 0.0
    copy_bandwidth: float = 0.0  # 0 = unlimited (copies take no time)
    hysteresis: float = 0.1
    min_rate: float = 0.0  # demand (bytes/s) below which a dataset is never promoted
    resolution: int = 1000  # knapsack DP size units

    def __post_init__(self) -> None:
        if not self.horizon > 0 or not self.max_horizon > 0:
            raise ValueError("horizon and max_horizon must be positive")
        if self.min_residency < 0 or self.copy_bandwidth < 0 or self.hysteresis < 0 or self.min_rate < 0:
            raise ValueError("min_residency, copy_bandwidth, hysteresis and min_rate must not be negative")
        if self.resolution < 1:
            raise ValueError("resolution must be >= 1")


@dataclass(frozen=True)
class Demand:
    """What the policy needs to know about one dataset's load."""

    rate: float = 0.0  # bytes/s while active in the window
    recent_rate: float = 0.0  # bytes/s over the newest part of the window
    age: float = 0.0  # seconds this dataset has been read without a window-long pause

    @property
    def estimate(self) -> float:
        return max(self.rate, self.recent_rate)


def demand_from_snapshot(snap: StatsSnapshot) -> dict[str, Demand]:
    """Per-dataset :class:`Demand` from a stats snapshot."""
    out: dict[str, Demand] = {}
    for name, d in snap.datasets.items():
        age = max(snap.now - d.active_since, 0.0) if d.active_since is not None else 0.0
        active = min(snap.span, age) if age > 0 else snap.span
        rate = d.window_bytes / max(active, snap.resolution)
        out[name] = Demand(rate=rate, recent_rate=d.recent_rate, age=age)
    return out


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one round."""

    hold: frozenset[str]
    promote: frozenset[str]  # hold − cached: copies to start
    demote: frozenset[str]  # cached − hold: copies to drop
    budget: int
    reasons: Mapping[str, str] = field(default_factory=dict)  # why each held dataset is held
    value: Mapping[str, float] = field(default_factory=dict)  # value used this round


# -- knapsack ---------------------------------------------------------------------------------


def _greedy(items: Sequence[tuple[str, int, float]], budget: int) -> list[str]:
    order = sorted(items, key=lambda it: (-(it[2] / it[1]) if it[1] else -math.inf, it[0]))
    out, left = [], budget
    for name, size, _ in order:
        if size <= left:
            out.append(name)
            left -= size
    return out


def _pareto(items: Sequence[tuple[str, int, float]], budget: int, resolution: int) -> list[str]:
    """Knapsack by a Pareto frontier of (exact bytes, value) states.

    States carry exact byte sums, so nothing picked can overshoot.  While the frontier holds at
    most ``2 * resolution`` states the answer is the exact optimum; past that, each size band of
    ``budget / resolution`` bytes keeps only its best state (which can only cost optimality).
    """
    band = budget / resolution
    limit = 2 * resolution
    # A state: (bytes, value, picks) with picks a linked list (item index, previous picks).
    states: list[tuple[int, float, Any]] = [(0, 0.0, None)]
    for idx, (_, size, value) in enumerate(items):
        shifted = [(s + size, v + value, (idx, ch)) for s, v, ch in states if s + size <= budget]
        if not shifted:
            continue
        frontier: list[tuple[int, float, Any]] = []
        best_v = -1.0
        for st in heapq.merge(states, shifted, key=lambda x: x[0]):
            if st[1] <= best_v:
                continue  # no lighter state is worth less: dominated
            if frontier and frontier[-1][0] == st[0]:
                frontier[-1] = st
            else:
                frontier.append(st)
            best_v = st[1]
        if len(frontier) > limit:
            thinned: list[tuple[int, float, Any]] = []
            for st in frontier:  # values increase with size: the last of each band is its best
                if thinned and int(thinned[-1][0] / band) == int(st[0] / band):
                    thinned[-1] = st
                else:
                    thinned.append(st)
            frontier = thinned
        states = frontier
    chosen: list[str] = []
    chain = states[-1][2]
    while chain is not None:
        chosen.append(items[chain[0]][0])
        chain = chain[1]
    return chosen


def best_subset(items: Iterable[tuple[str, int, float]], budget: int, resolution: int = 1000) -> list[str]:
    """Names of a high-value subset of ``(name, size, value)`` whose sizes sum to ``<= budget``.

    Items with value ``<= 0`` are never picked; zero-size items with positive value always are.
    Exact in bytes: no rounding can make the result overshoot.
    """
    pos = [it for it in items if it[2] > 0 and 0 <= it[1] <= budget]
    if budget <= 0 or not pos:
        return [name for name, size, _ in pos if size == 0]
    value = {name: v for name, _, v in pos}
    sizes = {name: s for name, s, _ in pos}
    picks = [_greedy(pos, budget)]
    if len(pos) * resolution <= DP_CELL_LIMIT and len(pos) > 1:
        picks.append(_pareto(pos, budget, resolution))
    best = max(picks, key=lambda p: (sum(value[n] for n in p), -sum(sizes[n] for n in p)))
    assert sum(sizes[n] for n in best) <= budget
    return best


# -- the policy -------------------------------------------------------------------------------


def choose(
    *,
    demand: Mapping[str, Demand],
    sizes: Mapping[str, int],
    capacity: int,
    free: int,
    cached: Mapping[str, float],
    pinned: Iterable[str] = (),
    never_cache: Iterable[str] = (),
    now: float,
    params: PolicyParams,
) -> Decision:
    """The set of datasets to hold in the cache (see the module docstring).

    ``cached`` maps each dataset now cached or being copied to the time it was promoted;
    ``free`` is the cache filesystem's free bytes minus the reserve, measured this round.
    """
    never = set(never_cache)
    pins = set(pinned)
    cached_bytes = sum(sizes[n] for n in cached if n in sizes)
    budget = max(0, min(int(capacity), cached_bytes + int(free)))
    eligible = {n for n, s in sizes.items() if n not in never and 0 <= s <= budget}

    bw = params.copy_bandwidth
    values: dict[str, float] = {}
    for name in eligible:
        d = demand.get(name, Demand())
        est = d.estimate
        size = sizes[name]
        if name in cached:
            values[name] = est * params.horizon * (1 + params.hysteresis)
        elif est >= params.min_rate and est > 0:
            copy_time = size / bw if bw > 0 else 0.0
            paid = est * (min(d.age, params.max_horizon) - copy_time) - params.admission * size
            values[name] = est * max(params.horizon - copy_time, 0.0) - size if paid > 0 else 0.0
        else:
            values[name] = 0.0

    def density(name: str) -> float:
        s = sizes[name]
        return values[name] / s if s else math.inf

    hold: list[str] = []
    reasons: dict[str, str] = {}
    left = budget

    def take(names: Iterable[str], why: str) -> None:
        nonlocal left
        for name in names:
            if name not in reasons and sizes[name] <= left:
                hold.append(name)
                reasons[name] = why
                left -= sizes[name]

    take(sorted(pins & eligible, key=lambda n: (n not in cached, -density(n), n)), "pinned")
    young = [n for n in eligible if n in cached and now - cached[n] < params.min_residency]
    take(sorted(young, key=lambda n: (-density(n), n)), "min_residency")

    rest = [n for n in eligible if n not in reasons]
    incumbents = [n for n in rest if n in cached]

    def plan(names: Sequence[str]) -> tuple[list[str], float]:
        items = [(n, sizes[n], values[n]) for n in names]
        picked = best_subset(items, left, params.resolution)
        return picked, sum(values[n] for n in picked)

    keep, keep_value = plan(incumbents)
    change, change_value = plan(rest)
    picked, why = (change, "value") if change_value > keep_value else (keep, "value")
    take(sorted(picked, key=lambda n: (-density(n), n)), why)
    # Idle incumbents stay while the space is not wanted.
    idle = [n for n in incumbents if n not in reasons]
    take(sorted(idle, key=lambda n: (-density(n), -cached[n], n)), "kept")

    held = frozenset(hold)
    assert sum(sizes[n] for n in held) <= budget
    cached_set = frozenset(cached)
    decision = Decision(
        hold=held,
        promote=held - cached_set,
        demote=cached_set - held,
        budget=budget,
        reasons=reasons,
        value=values,
    )
    if decision.promote or decision.demote:
        log.debug(
            "policy at %.1f: budget %d, promote %s, demote %s",
            now,
            budget,
            sorted(decision.promote),
            sorted(decision.demote),
        )
    return decision
