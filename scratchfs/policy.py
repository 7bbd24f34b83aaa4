"""The promotion policy: which datasets to hold on the node-local SSD.  Pure: no I/O, no clock.

:func:`choose` takes the measured demand, image sizes, the byte budget, pins, never-cache names,
what is cached since when, and ``now``; it returns the set to hold, and the order in which to
copy what it holds but is not cached yet (``queue``: the order the steps below take them in,
so datasets held for value first, by value per byte, then spare space by bytes expected from
the cache per byte).  mountd runs it every round and lets the copier converge on the answer.

Algorithm
---------
1. **Budget, in exact bytes.**  ``budget = min(capacity, bytes of the cached images + free)``
   where ``free`` is the real free space of the cache filesystem minus the reserve, measured
   this round.  Cached images (copies in progress included, counted at full size) are already
   on the disk, so they are inside ``bytes cached + free``; anything else that fills the disk
   shrinks ``free`` and hence the budget, which can force demotions.  Copies of demoted
   datasets that are still on the disk (``reclaimable``: mountd deletes them only when their
   space is needed) count as free.  Sizes are never rounded: the chosen set's total size is
   ``<= budget`` exactly.

2. **Eligible datasets**: known size, not in ``never_cache`` (never_cache beats a pin), and not
   larger than the budget.

3. **Forced holds**, in this order, each taken only if it still fits:
   pins (already cached ones first, then by value per byte), then cached datasets promoted less
   than ``min_residency`` ago (by value per byte).

4. **Value of the rest.**  All byte figures are *image* bytes: the read path counts bytes
   served (after decompression), and :func:`demand_from_snapshot` scales them by each
   image's compression ratio (image size / logical size, given by the caller; 1 if unknown),
   so reads are compared with copy sizes like with like.  A dataset's rate ``r`` is the higher
   of its throughput while active in the window and its throughput over the newest part of
   the window (so a rise is seen within a fraction of the window).  Value is the bytes
   expected to be read over a fixed ``horizon`` ``H`` (mountd: four windows):

   * cached (incumbent): ``value = r_held * H * (1 + hysteresis)`` (``r_held``: below, and
     see "through its own pauses"), plus, while it is being
     read now (``idle == 0``), its ``size`` but no more than its run is expected to read from
     now on (``remaining``, below): demoting a dataset in the middle of a run gives up a copy
     that run may well want back, and getting it back reads its size from scratch again; a run
     expected to read less than that would rather read the rest from scratch, so that is all
     the demotion can cost it beyond the reads valued at its rate.
     Paused in its run (no reads for ``idle`` seconds, less than a ``window``: a run ends after
     a window without reads), it keeps ``1 - idle / window`` of that if its own pauses have
     more often ended with reads again than ended its runs (``resumed + returns > runs -
     returns``, as in "through its own pauses" below), unless reads here are on and off (see
     "reads on and off": its run's mean rate holds it then).  Without this, a job pausing for
     seconds (9 s of a 30 s window, on recorded seed 2) gave its copy up to a dataset read at
     about its held rate, and was copied back moments later when the job went on.  Tuning figures
     (``tools/simulate_traces.py``): all five recorded traces meet the targets (seed 2:
     hit ratio 0.688 against 0.664, copies 0.99× scratch_manager's against 1.04×), ``jobs``
     40 of 40 seeds, and ``hot``/``shift``/``scan`` miss on the same three of 525 traces as
     without it; in every pause of every incumbent, ``hot`` seed 60 misses too; where reads
     are on and off too, ``jobs`` seed 14 falls below 0.9× the oracle.
     ``r_held`` is the rate over the newest part of the window, but not below ``held_floor``
     (0.5) times the rate over the window: a run that is winding down gives its place up within
     a fraction of the window, instead of holding it for as long as its past reads stay in the
     window, while a short lull (a job ending, the next one not yet started) costs an incumbent
     at most half its value.  A candidate is valued at the higher of its rates, so a rise is
     seen at once; under constant demand the two are the same rate.  An incumbent is never
     worth less than it would be as a candidate (it has its copy): otherwise one valued at a
     held rate below its window rate could lose its place to a dataset that then loses it back,
     for ever, under unchanging demand.
   * not cached (candidate): ``value = r * max(H - size / copy_bandwidth, 0) - copy_charge *
     size``: the bytes it would serve from the SSD once copied (reads during the copy still go
     to scratch) minus a share (``copy_charge``, 0.5) of the bytes the copy itself reads from
     scratch.  The share is a tuning figure, measured with ``tools/simulate_traces.py``: the
     full size (1) leaves copies of large hot images later than the reads they would serve.
     A candidate whose copy is still on the disk (``reclaimable``) is served from it again at
     once: no copy time, no copy charge.

   **Reads on and off.**  Where datasets are read job after job, each by one job at a time,
   a hot dataset's reads pause between its jobs and go on; where many jobs overlap, a dataset
   whose reads pause is mostly done.  :mod:`.stats` counts, per dataset, the pauses within its
   runs that ended with reads again (``resumed``) and those that ended the run (``runs``).
   When, pooled over the datasets being read, more than ``ON_OFF_SHARE`` (0.6) of at least
   ``ON_OFF_PAUSES`` (5) pauses resumed, the rate of an incumbent in a run says little about
   its next minutes (in a pause it is 0): it is valued at no less than ``RUN_RATE_SHARE``
   (0.7) of its run's mean rate (``run / age``), and first runs get no prior (below): there,
   the datasets first read late are mostly ones read by a short job or scanned once, and the
   prior, fed by the long runs of the hot ones, had them copied over hot ones paused between
   jobs.  Tuning figures, measured with ``tools/simulate_traces.py``: on the ``jobs`` shape
   the rule lifts the traces meeting the targets from 22 to 28 of 40 seeds at 7 pauses and
   to 30 at 5 (4 and 6 do as well as 5); switched on earlier (3 pauses, half of them) it
   reaches 33 but fires on ``hot`` traces, where the run's mean rate holds datasets whose
   demand went elsewhere (``hot`` seed 70 misses).

   **Through its own pauses.**  The rule above looks at all datasets together and needs a few
   pauses first; this one looks at each incumbent alone, once its demotions have been shown
   wrong.  An incumbent copied back at least ``RECOPIES`` (2) times within ``RETURN_WINDOWS``
   windows of being demoted (``recopied``, counted by the caller: see :func:`copied_back`), and
   whose own pauses have more often ended with reads again than ended its runs for good
   (``resumed + returns > runs - returns``: a run followed by reads again within
   ``RETURN_WINDOWS`` windows counts as a return, see :mod:`.stats`), is valued at no less
   than its long-term rate (its reads decayed with a time constant of ``LONG_WINDOWS``
   windows: two horizons in mountd), in a pause as well as while it is read, and even once its
   reads have left the window.  Where the datasets read job after job need more room than
   there is, one between two of its jobs otherwise gives its place to a dataset read by a short
   job (valued at its rate now over the whole horizon) and is copied back when its next job
   starts, over and over; keeping the datasets read most over the last hours is what the
   offline optimum does there.  Where many jobs overlap, datasets
   of middle rank are read in bursts that pause and resume too, and the long-term rate would
   hold one after its burst against the next; they are seldom copied back soon after a
   demotion, so the rule waits for that evidence (an adaptive cache's "ghost hit").  A dataset
   whose demand went elsewhere has mostly ended runs, so its past reads do not hold its place;
   a candidate is valued on its reads now.  Tuning figures (``tools/simulate_traces.py``): on
   ``jobs`` 32 → 38 of 40 seeds meet the targets, ``hot``/``shift`` miss on the same traces
   as before, recorded seed 2 copies 1.04× scratch_manager's (1.11× before) but falls below
   0.9× the oracle; with no copies back asked for, ``jobs`` 39 of 40 but 9 more
   ``hot``/``shift`` misses in 315 traces; with returns counted as resumed pauses in the
   rule above too, all five recorded traces pass but 4 more ``hot``/``shift`` traces miss.

   **Admission.**  A candidate is given that value only if its current run is expected to be
   long, by one of three rules:

   * *this run*: it is expected to read more than its size after the copy is done: with
     ``remaining`` the bytes the run is expected to read from now on,
     ``remaining - r * copy_time > size``.  A run that has lasted ``age`` is expected to last
     as long again (``remaining = r * age``: the classic rent-or-buy rule, which never pays
     more than about twice what the best choice in hindsight pays in traffic); if the
     dataset's previous run read more than this one so far, as much as that one
     (``remaining = last_run - run``);
   * *its last run* read at least ``LONG_RUN`` (1.5) times its size: its runs are long, so
     this one is taken to be long from its start;
   * *runs here are long*: the dataset has no finished run yet, and the runs of the others
     say its run will read more than its size once copied.  The prior ``m`` is the upper
     quartile (``PRIOR_QUANTILE``), over the datasets whose last run is known (at least
     ``MIN_KNOWN_RUNS``), of their last run's bytes per byte of image (a tuning figure,
     measured with ``tools/simulate_traces.py``: the median held the first runs of large hot
     datasets back); the run is expected to read ``m * size`` in all, so
     it is admitted when ``m * size - run - r * copy_time > size``, and its value counts no
     more than that from the cache (``min(r * (H - copy_time), m * size - run - r *
     copy_time)``, less the copy charge).  A dataset with no finished run whose run going on
     has already read ``LONG_RUN`` times its size counts with what it has read, so the prior
     is there before any run has ended.  Where datasets are read by long jobs, again and
     again, a new one is copied at once instead of after a rent-or-buy wait that, for a large
     image, lasts most of a job; where most runs read a dataset once (a scan) or a part of it,
     a new dataset waits for its own run to show it is long.  The prior says how much
     the run will read, not only that it will be long: a new dataset read fast is valued at
     what its run is expected to read, not at its rate over the whole horizon, so it does not
     displace a dataset in the middle of a run known to be long, as a scan started among
     datasets read many times over would.  Nor is it valued at a rate it has shown for a few
     seconds only: admitted on the prior alone, a run counts its rate in full once it has
     lasted ``PRIOR_RAMP`` of the horizon (an eighth: half a window in mountd) and in
     proportion before, as if its bytes so far were spread over that time (scratch_manager's
     window throughput spreads them over half its window).  Where there is room it is copied
     at once all the same (as spare space while its value is not yet positive, step 6); but
     a burst of a minute at a high rate, such as the scan of a small image, does not displace
     a hot dataset paused between two of its jobs.  Tuning figures
     (``tools/simulate_traces.py``): on ``jobs`` 30 → 32 of 40 seeds, one more recorded trace
     meets the targets; on ``hot`` and ``shift`` it costs 0.0013 of hit ratio on average
     (at most 0.014), by copying some long first runs later.  Ramped over a quarter window
     or three eighths of one instead, it does worse on ``jobs`` and the recorded traces.

   So a dataset read once, start to end (a scan), never qualifies on its own and stays on
   scratch; one read over and over qualifies after its first pass; one whose last run was
   long qualifies as soon as its next run starts.  Runs are separated by a window without
   reads (see :mod:`.stats`).  Candidates not admitted, with ``value <= 0`` or a rate not
   above ``min_rate`` are worth 0.

   **Only runs still going are copied.**  A candidate must be read *now*: reads in the newest
   bucket or the one before it (``idle == 0``, see :func:`demand_from_snapshot`).  A dataset
   whose reads stopped keeps a rate until its reads leave the window, but a copy started then
   serves nothing to the run that is over; most short runs end before their copy would, and
   those copies (a queue of them, behind a serial copier) were most of the bytes copied for
   nothing.  Such a candidate is worth 0 and gets no spare space; incumbents are not affected.

   Value per byte (``value / size``) ranks datasets.

5. **Knapsack** over the remaining budget: the better (by total value) of a greedy fill by value
   per byte (skipping what does not fit and going on) and a dynamic programme over the Pareto
   frontier of (exact bytes, value) states.  The frontier is exact while it has at most
   ``2 * resolution`` states; beyond that each ``budget / resolution`` band of sizes keeps only
   its best state.  Either way the sums are exact bytes: no rounding can overshoot.  The
   dynamic programme runs only while ``items * resolution`` stays small enough for a round,
   and not at all when everything valued fits (all of it is taken: often so, with many small
   datasets and room for them).

6. **Keep idle incumbents** while there is room: cached datasets that lost their demand stay
   (best value per byte first) as long as nothing with value needs the space, so returning
   demand finds them still cached and nothing is copied twice.

   **Spare space** (``spare``, on by default): space that no valued dataset wants is lent to
   candidates being read that were not admitted (or whose value is not positive) but would
   serve reads from the cache once copied (``r * (H - copy_time) > 0``), most such bytes per
   byte first, counting only what the run is expected to read once the copy is done (``min(r *
   (H - copy_time), remaining - r * copy_time)``), so of two runs at one rate the one that
   began longer ago comes first.  An idle incumbent whose last run paid for a copy (read at
   least its size) keeps its place while reads of it are still in the window; once they have
   left it, it comes after the datasets being read now.  Of those, the ones whose last run read
   the most per byte of image keep their places longest: a dataset read many times over in its
   last run is the likeliest to be read again, where one promoted last may have been read once.
   One whose last run did not pay (or that was never seen in a run) holds its space on loan
   only: it is demoted when a dataset being read wants the space, the newest promoted loans
   kept longest.  Nothing held for value, pinned or within ``min_residency`` is ever demoted
   for spare space.  This trades copy traffic for hits where the SSD would otherwise hold data
   nobody reads; ``spare=False`` keeps the cache to admitted datasets and keeps every idle
   incumbent while there is room.

7. **Hysteresis / no flapping.**  The same steps are run with incumbents only; the set with
   candidates replaces it only if its total value is strictly higher.  Each dataset is worth
   at least as much as an incumbent as it would be as a candidate, so the new set's total
   value, counted with every member as an incumbent, is strictly higher than the old set's:
   under constant demand that total rises with every change, and with finitely many sets it
   converges and never cycles.  Hysteresis adds a margin: under constant demand
   (``r_held = r``) a candidate is worth at most ``r * H``, an incumbent ``r * H * (1 +
   hysteresis)``.  Incumbents also do not pay the copy charge a candidate pays, and one being
   read is worth up to its size more, which is what keeps two datasets of similar demand from
   trading places.  Spare space changes nothing here: a loan is only ever taken back by a
   dataset being read (``r > 0``) from one that is not (``r = 0``), so under constant demand a
   loan given back is never asked for again.

   **Known defect: flapping when demand changes.**  The argument above needs each dataset to
   be worth at least as much cached as not.  An incumbent whose recent rate fell is valued at
   its floor, its worth as a candidate *with* the copy time and copy charge; demoted, its copy
   is still on the disk (``reclaimable``) and it is valued as a candidate *without* them, so
   higher.  With no hysteresis between the two, it is demoted and taken back round after
   round: replayed by the simulator, 48 of the 120 ``hot``/``shift`` traces of seeds 0–59
   have a dataset demoted and promoted again within 10 s, up to 72 times in one trace (its
   readers switched back and forth, its copy kept and served again each time, and a copy
   started for the dataset displacing it cancelled as often).
   Counting an incumbent's floor without the copy costs removes most of them but costs hit
   ratio elsewhere (``hot`` seed 189 falls 0.0065 below scratch_manager's); so does valuing a
   reclaimable candidate at no more than it would be worth cached (without the hysteresis):
   ``hot`` 255–265 traces with flaps 5 → 1, ``hot`` 189 the same −0.0065 (it has only two
   flaps, from t=10092; its loss is a different course after them).  Not fixed yet.

8. **A copy gives way** (:func:`gives_way`, called by mountd and the simulator with the copy
   that is running and the first of ``queue``).  Copies run one at a time, so a large copy
   started for a moderate demand can keep a dataset read much faster waiting for most of its
   copy time.  With ``left`` the seconds the running copy still needs, ``t`` the waiting
   dataset's copy time and ``done`` the bytes copied so far, the running copy is cancelled
   when ``min(r_waiting * left, expected) > r_running * t + WASTE * done``: the waiting
   dataset's reads over ``left`` would come from the SSD instead of scratch (but no more than
   ``expected``, what :func:`choose` expects it to serve from the cache once copied: for one
   not admitted, what its run is expected to read after its copy, so a scan read once at a
   high rate, over before its copy would be, gains nothing), at the price of the running
   one's reads over ``t`` and of its bytes copied so far (counted ``WASTE`` = 2 times: mountd
   keeps them and its next copy of that dataset goes on from them, but only until a copy needs
   their space, and then they are read from scratch twice, traffic no reader gets; and
   cancelling is a bet on rates measured now).  This is Smith's rule (most reads per second
   of copy first) with a price on the work put at risk.  Under constant rates it cannot go
   back and forth: the copy that took over never gives way to the one it replaced, since that
   would need ``r_running * t_waiting > r_waiting * left``, the opposite of what let it start.
   mountd starts the waiting one next, before the cancelled one (which the policy's order may
   put first again).  Copies an admin asked for (pins, prefetches) never give way.

Datasets not in ``sizes`` (their image went away) are never held.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import RETURN_WINDOWS, StatsSnapshot

log = logging.getLogger(__name__)

#: Above this many (items × resolution) the knapsack uses the greedy fill alone, to bound the
#: time of one policy round.
DP_CELL_LIMIT = 2_000_000

#: The horizon mountd and the trace simulator use, in throughput windows.
HORIZON_WINDOWS = 4

#: A run that read at least this many times its dataset's image size is a long run.
LONG_RUN = 1.5
#: New datasets are judged by the last runs of others once at least this many are known...
MIN_KNOWN_RUNS = 3
#: ...by the run this far up their sizes (in bytes read per byte of image), lowest first.
PRIOR_QUANTILE = 0.75
#: A run admitted on the prior alone counts its rate in full once it has lasted this share of the
#: horizon (mountd: half a window), and in proportion before.
PRIOR_RAMP = 1 / (2 * HORIZON_WINDOWS)
#: A copy cancelled to let a faster-read dataset go first costs its bytes copied this many times.
WASTE = 2.0
#: Reads are on and off when more than this share of the pauses seen (at least ON_OFF_PAUSES)...
ON_OFF_SHARE = 0.6
ON_OFF_PAUSES = 5
#: ...and then an incumbent in a run is valued at no less than this share of the run's mean rate.
RUN_RATE_SHARE = 0.7
#: An incumbent read on and off is held at its long-term rate once copied back this many times
#: within RETURN_WINDOWS windows of a demotion.
RECOPIES = 2


@dataclass(frozen=True)
class PolicyParams:
    """Tuning of :func:`choose`.  Times in seconds, bandwidth in bytes/s."""

    horizon: float = 2400.0  # how far ahead reads are predicted (mountd: HORIZON_WINDOWS × window)
    window: float = 600.0  # the throughput window: a run ends after a window without reads
    min_residency: float = 0.0
    copy_bandwidth: float = 0.0  # 0 = unlimited (copies take no time)
    hysteresis: float = 0.4
    held_floor: float = 0.5  # an incumbent's rate: its recent rate, not below this share of its window rate
    copy_charge: float = 0.5  # share of a candidate's image size charged against its value
    min_rate: float = 0.0  # demand (bytes/s) below which a dataset is never promoted
    spare: bool = True  # fill space no valued dataset wants with datasets that would be read from it
    resolution: int = 1000  # knapsack DP size units

    @classmethod
    def for_window(cls, window: float, **kw: Any) -> PolicyParams:
        """The params mountd (and the simulator replaying it) run with for a throughput
        ``window``: the horizon is ``HORIZON_WINDOWS`` windows."""
        return cls(horizon=HORIZON_WINDOWS * window, window=window, **kw)

    def __post_init__(self) -> None:
        if not (self.horizon > 0 and self.window > 0):
            raise ValueError("horizon and window must be positive")
        if min(self.min_residency, self.copy_bandwidth, self.hysteresis, self.min_rate, self.copy_charge) < 0:
            raise ValueError("min_residency, copy_bandwidth, hysteresis, min_rate and copy_charge must not be negative")
        if not 0 <= self.held_floor <= 1:
            raise ValueError("held_floor must be in [0, 1]")
        if self.resolution < 1:
            raise ValueError("resolution must be >= 1")


@dataclass(frozen=True)
class Demand:
    """What the policy needs to know about one dataset's load, in image bytes (see ``scale``)."""

    rate: float = 0.0  # bytes/s while active in the window
    recent_rate: float = 0.0  # bytes/s over the newest part of the window
    age: float = 0.0  # seconds this dataset has been read without a window-long pause
    run_bytes: float | None = None  # bytes of the current run (None: rate × age)
    last_run_bytes: float = 0.0  # bytes of the previous run
    idle: float = 0.0  # seconds since the last read, beyond one stats bucket (0: being read now)
    runs: int = 0  # finished runs: pauses that ended a run
    resumed: int = 0  # pauses within a run that ended with reads again
    returns: int = 0  # finished runs followed by reads again soon (see :mod:`.stats`)
    long_rate: float = 0.0  # bytes/s, decayed over several windows (see :mod:`.stats`)

    @property
    def estimate(self) -> float:
        return max(self.rate, self.recent_rate)

    @property
    def run(self) -> float:
        return self.run_bytes if self.run_bytes is not None else self.rate * self.age

    @property
    def pauses_resume(self) -> bool:
        """Whether this dataset's own pauses have more often ended with reads again than ended
        its runs for good (a run followed by reads again soon counts as a resumed pause)."""
        return self.resumed + self.returns > self.runs - self.returns

    def held_rate(self, floor: float, run_share: float = 0.0) -> float:
        """The rate a cached dataset is valued at: its recent rate, not below ``floor`` times its
        rate over the window, nor, in a run, below ``run_share`` times the run's mean rate (where
        reads are on and off; see the module docstring)."""
        rate = max(self.recent_rate, floor * self.rate)
        if run_share > 0 and self.estimate > 0 and self.age > 0:
            rate = max(rate, run_share * self.run / self.age)
        return rate

    def remaining(self) -> float:
        """Bytes the current run is expected to read from now on (0 between runs).

        A run that has lasted ``age`` is expected to last as long again, at the current rate;
        or, if the previous run read more, to read as much as that one in all: a dataset whose
        runs are long is expected to be read long again from the start of its next run, while
        one read once end to end (a scan) is not.
        """
        est = self.estimate
        if est <= 0:
            return 0.0
        return max(est * self.age, self.last_run_bytes - self.run)

    def after_copy(self, copy_time: float) -> float:
        """Bytes the current run is expected to read once a copy taking ``copy_time`` is done."""
        return self.remaining() - self.estimate * copy_time

    def predicted(self, start: float, end: float) -> float:
        """Bytes expected to be read between ``start`` and ``end`` seconds from now, at the
        current rate (what a candidate would serve from the cache once copied; a held dataset
        is valued at :meth:`held_rate` instead)."""
        return self.estimate * max(end - start, 0.0)


def demand_from_snapshot(snap: StatsSnapshot, scale: Mapping[str, float] | None = None) -> dict[str, Demand]:
    """Per-dataset :class:`Demand` from a stats snapshot.

    The read path counts the bytes it *serves*, after decompression; image sizes (what a copy
    reads, what the cache holds) are compressed bytes.  ``scale`` maps a dataset to its image
    bytes per served byte (image size / logical size of its files, its compression ratio) and
    every byte figure is multiplied by it, so the policy compares like with like: the bytes a
    dataset's reads take from the storage it is on, against the bytes its copy takes.  A
    dataset missing from ``scale`` counts 1 (served bytes taken as image bytes).

    Datasets with nothing in the window get only their last run's bytes, and are left out if
    they have none: :func:`choose` takes a missing dataset as ``Demand()``.
    """
    out: dict[str, Demand] = {}
    ratio = scale or {}
    for name, d in snap.datasets.items():
        idle = max(snap.now - snap.resolution - d.last_read, 0.0) if d.last_read is not None else 0.0
        if not d.window_bytes:
            if d.last_run_bytes:
                out[name] = Demand(
                    last_run_bytes=d.last_run_bytes * ratio.get(name, 1.0),
                    idle=idle,
                    runs=d.runs,
                    resumed=d.resumed,
                    returns=d.returns,
                    long_rate=d.long_rate(snap.now, snap.tau) * ratio.get(name, 1.0),
                )
            continue
        k = ratio.get(name, 1.0)
        age = max(snap.now - d.active_since, 0.0) if d.active_since is not None else 0.0
        active = min(snap.span, age) if age > 0 else snap.span
        rate = d.window_bytes / max(active, snap.resolution)
        out[name] = Demand(
            rate=rate * k,
            recent_rate=d.recent_rate * k,
            age=age,
            run_bytes=d.run_bytes * k,
            last_run_bytes=d.last_run_bytes * k,
            idle=idle,
            runs=d.runs,
            resumed=d.resumed,
            returns=d.returns,
            long_rate=d.long_rate(snap.now, snap.tau) * k,
        )
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
    # candidates: bytes each is expected to serve from the cache once copied (within the
    # horizon; for one not admitted, no more than its run is expected to read after the copy)
    expected: Mapping[str, float] = field(default_factory=dict)
    queue: tuple[str, ...] = ()  # the promotions, in the order to copy them (most wanted first)


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
    if sum(size for _, size, _ in pos) <= budget:
        return [name for name, _, _ in pos]  # all fit: nothing to choose between
    value = {name: v for name, _, v in pos}
    sizes = {name: s for name, s, _ in pos}
    picks = [_greedy(pos, budget)]
    if len(pos) * resolution <= DP_CELL_LIMIT and len(pos) > 1:
        picks.append(_pareto(pos, budget, resolution))
    best = max(picks, key=lambda p: (sum(value[n] for n in p), -sum(sizes[n] for n in p)))
    assert sum(sizes[n] for n in best) <= budget
    return best


# -- the policy -------------------------------------------------------------------------------


def copied_back(demoted_at: float | None, now: float, window: float) -> bool:
    """Whether a copy of a dataset starting at *now* copies it back soon after its demotion at
    *demoted_at* (None: never demoted): within ``RETURN_WINDOWS`` throughput windows.  Copies
    served again from a copy kept on the disk are not copies (nothing is read from scratch)."""
    return demoted_at is not None and now - demoted_at < RETURN_WINDOWS * window


def run_prior(demand: Mapping[str, Demand], sizes: Mapping[str, int]) -> float:
    """What a dataset's first run is expected to read here, in multiples of its image size.

    Of the datasets whose last run is known (at least ``MIN_KNOWN_RUNS``), the upper quartile
    (``PRIOR_QUANTILE``) of their last runs' bytes per byte of image; a dataset with no finished
    run whose run going on has already read ``LONG_RUN`` times its size counts with what it has
    read (a short one may still grow: unknown).  0 with fewer known runs.
    """
    known: list[float] = []
    for n, d in demand.items():
        size = sizes.get(n, 0)
        if size <= 0:
            continue
        if d.last_run_bytes > 0:
            known.append(d.last_run_bytes / size)
        elif d.estimate > 0 and d.run >= LONG_RUN * size:
            known.append(d.run / size)
    if len(known) < MIN_KNOWN_RUNS:
        return 0.0
    return sorted(known)[min(len(known) - 1, int(PRIOR_QUANTILE * len(known)))]


def on_and_off(demand: Mapping[str, Demand]) -> bool:
    """Whether the datasets being read (reads in the window) are read on and off: of the pauses
    seen in their runs (at least ``ON_OFF_PAUSES``), more than ``ON_OFF_SHARE`` ended with reads
    again rather than with the end of the run (see the module docstring)."""
    active = [d for d in demand.values() if d.estimate > 0]
    resumed = sum(d.resumed for d in active)
    pauses = resumed + sum(d.runs for d in active)
    return pauses >= ON_OFF_PAUSES and resumed > ON_OFF_SHARE * pauses


def admitted(d: Demand, size: int, copy_time: float, prior: float) -> float | None:
    """Whether a candidate's current run is expected to be long (see the module docstring):
    ``None`` if not, else the most its copy is expected to serve (``math.inf``: whatever the
    horizon holds; admitted by the prior: what the prior expects its run to read once copied).
    """
    if d.after_copy(copy_time) > size or d.last_run_bytes >= LONG_RUN * size:
        return math.inf
    if d.last_run_bytes == 0:
        by_prior = prior * size - d.run - d.estimate * copy_time
        if by_prior > size:
            return by_prior
    return None


def _last_run(demand: Mapping[str, Demand], name: str) -> float:
    d = demand.get(name)
    return d.last_run_bytes if d is not None else 0.0


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
    reclaimable: Collection[str] = (),
    recopied: Mapping[str, int] | None = None,
) -> Decision:
    """The set of datasets to hold in the cache (see the module docstring).

    ``cached`` maps each dataset now cached or being copied to the time it was promoted;
    ``free`` is the cache filesystem's free bytes minus the reserve, measured this round, plus
    the bytes of the ``reclaimable`` copies: demoted datasets' copies still on the disk, which
    serve again without a copy.  ``recopied`` counts, per dataset, the copies that copied it
    back soon after a demotion (:func:`copied_back`).
    """
    never = set(never_cache)
    back = recopied or {}
    pins = set(pinned)
    cached_bytes = sum(sizes[n] for n in cached if n in sizes)
    budget = max(0, min(int(capacity), cached_bytes + int(free)))
    # Only datasets with demand, cached or pinned can be held: the rest are not looked at.
    relevant = {n for n in (*demand, *cached, *pins) if n in sizes}
    eligible = {n for n in relevant if n not in never and 0 <= sizes[n] <= budget}

    bw = params.copy_bandwidth
    horizon = params.horizon
    values: dict[str, float] = {}
    gains: dict[str, float] = {}  # candidates: bytes they would serve from the cache within the horizon
    # ... and of those, no more than the run going on is expected to read once copied
    spare_gains: dict[str, float] = {}
    expected: dict[str, float] = {}  # ... the one or the other, as admitted or not
    intermittent = on_and_off(demand)
    prior = 0.0 if intermittent else run_prior(demand, sizes)
    run_share = RUN_RATE_SHARE if intermittent else 0.0  # a pause says little: an incumbent's run's mean rate
    for name in eligible:
        d = demand.get(name)
        size = sizes[name]
        values[name] = 0.0
        if d is None:  # no demand: worth nothing (cached or pinned)
            continue
        if d.estimate > params.min_rate and d.idle <= 0:  # being read now: what a copy serves
            copied = name in reclaimable  # its copy is still on the disk: nothing to copy
            copy_time = size / bw if bw > 0 and not copied else 0.0
            gain = d.predicted(copy_time, horizon)
            within_run = min(gain, max(d.after_copy(copy_time), 0.0))
            cap = admitted(d, size, copy_time, prior)
            shown = gain  # admitted on the prior alone: valued on the reads it has shown
            if cap is not None and cap < math.inf:
                shown *= min(1.0, d.age / (PRIOR_RAMP * horizon))
            served = min(shown, cap) if cap is not None else None  # admitted: what its copy serves
            if served is not None:
                values[name] = served - (0.0 if copied else params.copy_charge * size)
            if name not in cached:
                gains[name], spare_gains[name] = gain, within_run
                expected[name] = served if served is not None else within_run
        if name in cached:
            rate = d.held_rate(params.held_floor, run_share)
            # read on and off, and copied back soon after a demotion: through its pauses, at its long-term rate
            if d.pauses_resume and back.get(name, 0) >= RECOPIES:
                rate = max(rate, d.long_rate)
            as_held = rate * horizon * (1 + params.hysteresis)
            # in the middle of a run, or paused in one whose pauses mostly end with reads again:
            # its copy is worth keeping, less so as the pause goes on
            if d.estimate > 0 and (d.idle <= 0 or (d.pauses_resume and not intermittent)):
                as_held += max(0.0, 1 - d.idle / params.window) * min(size, d.remaining())
            # never worth less than it would be as a candidate: it has its copy
            values[name] = max(as_held, values[name])

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
    if params.spare:
        # Idle incumbents whose last run did not pay for a copy hold their space on loan only.
        lent = {n for n in idle if _last_run(demand, n) < sizes[n]}
        # ... the rest keep it, most read per byte in their last run first
        paid = sorted((n for n in idle if n not in lent), key=lambda n: (-density(n), -_last_run(demand, n) / max(sizes[n], 1), n))
        # Those with no reads left in the window come after the datasets being read now.
        stale = [n for n in paid if (d := demand.get(n)) is None or d.estimate <= 0]
        take([n for n in paid if n not in stale], "kept")
        # Space nobody wants: datasets being read that do not (yet) pay for their copy, most
        # bytes expected from the cache per byte first; then the loans, newest first.
        spare = [n for n, g in gains.items() if n not in reasons and g > 0 and values[n] <= 0]
        take(sorted(spare, key=lambda n: (-spare_gains[n] / max(sizes[n], 1), n)), "spare")
        take(stale, "kept")
        take(sorted(lent, key=lambda n: (-cached[n], n)), "kept")
    else:
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
        queue=tuple(n for n in hold if n not in cached_set),
        expected=expected,
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


def gives_way(
    running: Demand | None,
    running_size: int,
    done: int,
    waiting: Demand | None,
    waiting_size: int,
    expected: float,
    copy_rate: float,
) -> bool:
    """Whether the copy running (``done`` of ``running_size`` bytes copied, at ``copy_rate``
    bytes/s) should be cancelled so that ``waiting`` is copied first; ``expected`` is what the
    waiting one is expected to serve from the cache once copied (``Decision.expected``; see
    the module docstring, step 8).  No measured copy rate, no demand for the waiting dataset:
    no."""
    if copy_rate <= 0 or waiting is None or waiting.estimate <= 0:
        return False
    keep = running.estimate if running is not None else 0.0
    # min(r_waiting * left, expected) > r_running * t + WASTE * done, all times copy_rate (no
    # rounding can make a tie, or the comparison the other way round, come out true)
    gain = min(waiting.estimate * max(running_size - done, 0), expected * copy_rate)
    return gain > keep * waiting_size + WASTE * done * copy_rate
