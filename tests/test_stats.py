"""Sliding-window throughput: pure, injected time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchfs.stats import CACHE, LONG_WINDOWS, PAUSE_BUCKETS, RETURN_WINDOWS, SCRATCH, ThroughputStats


def test_window_rate_and_totals() -> None:
    s = ThroughputStats(window=60, buckets=6, start=0.0)
    for t in range(60):  # 1000 bytes/s for a minute, all from scratch
        s.record("a", SCRATCH, 1000, float(t))
    snap = s.snapshot(60.0)
    a = snap.datasets["a"]
    # window at 60.0: buckets 1..6 (times 10..70) → reads at t=10..59 = 50 reads
    assert a.window_bytes == 50_000
    assert a.rate == pytest.approx(50_000 / snap.span)
    assert a.total_bytes == 60_000
    assert a.total_requests == 60
    assert a.hit_ratio == 0.0


def test_old_buckets_expire() -> None:
    s = ThroughputStats(window=60, buckets=6)
    s.record("a", SCRATCH, 500, 5.0)
    assert s.snapshot(30.0).datasets["a"].window_bytes == 500
    late = s.snapshot(200.0).datasets["a"]
    assert late.window_bytes == 0
    assert late.rate == 0.0
    assert late.total_bytes == 500  # totals survive the window


def test_slot_reuse_resets_counts() -> None:
    s = ThroughputStats(window=60, buckets=6)
    s.record("a", SCRATCH, 100, 5.0)  # bucket 0, slot 0
    s.record("a", SCRATCH, 7, 65.0)  # bucket 6, same slot 0: must not add the old 100
    assert s.snapshot(65.0).datasets["a"].window_bytes == 7


def test_tiers_and_hit_ratio() -> None:
    s = ThroughputStats(window=60)
    s.record("a", SCRATCH, 300, 1.0)
    s.record("a", CACHE, 100, 2.0)
    s.record("b", CACHE, 600, 2.0)
    snap = s.snapshot(3.0)
    a = snap.datasets["a"]
    assert a.tier_total(SCRATCH) == 300 and a.tier_total(CACHE) == 100
    assert a.hit_ratio == pytest.approx(0.25)
    assert a.tiers[CACHE].window_requests == 1
    assert snap.hit_ratio == pytest.approx(700 / 1000)
    assert snap.tier_total(CACHE) == 700


def test_no_reads_no_ratio() -> None:
    s = ThroughputStats(window=10)
    snap = s.snapshot(5.0)
    assert snap.hit_ratio is None and snap.datasets == {}


def test_time_going_backwards_counts_in_totals_only() -> None:
    s = ThroughputStats(window=60, buckets=6)
    s.record("a", SCRATCH, 10, 100.0)
    s.record("a", SCRATCH, 5, 30.0)  # a clock that went back: older than the window at t=100
    a = s.snapshot(100.0).datasets["a"]
    assert a.total_bytes == 15
    assert a.window_bytes == 10


def test_recent_rate_sees_a_rise_first() -> None:
    s = ThroughputStats(window=100, buckets=10, recent_fraction=0.2)
    for t in range(80, 100):
        s.record("a", SCRATCH, 1000, float(t))
    snap = s.snapshot(100.0)
    a = snap.datasets["a"]
    assert a.recent_rate > a.rate  # 20 s of reads averaged over ~20 s vs ~100 s


def test_active_since_tracks_runs() -> None:
    s = ThroughputStats(window=60, buckets=6)
    s.record("a", SCRATCH, 1, 12.0)
    assert s.snapshot(15.0).datasets["a"].active_since == 10.0  # start of its first bucket
    s.record("a", SCRATCH, 1, 50.0)
    assert s.snapshot(55.0).datasets["a"].active_since == 10.0  # still the same run
    assert s.snapshot(200.0).datasets["a"].active_since is None  # a window without reads ends it
    s.record("a", SCRATCH, 1, 205.0)
    assert s.snapshot(206.0).datasets["a"].active_since == 200.0


def test_forget_and_retain() -> None:
    s = ThroughputStats(window=60)
    for name in ("a", "b", "c"):
        s.record(name, SCRATCH, 1, 1.0)
    s.forget("a")
    assert s.datasets() == {"b", "c"}
    s.retain(["c"])
    assert set(s.snapshot(2.0).datasets) == {"c"}


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        ThroughputStats(window=0)
    with pytest.raises(ValueError):
        ThroughputStats(window=10, buckets=1)


@settings(max_examples=200, deadline=None)
@given(
    buckets=st.integers(2, 12),
    width=st.sampled_from([0.5, 1.0, 7.0]),
    reads=st.lists(st.tuples(st.floats(0, 500), st.integers(0, 10_000)), max_size=60),
    probe=st.floats(0, 600),
)
def test_window_matches_brute_force(buckets: int, width: float, reads: list[tuple[float, int]], probe: float) -> None:
    """The bucket ring reports exactly the reads whose bucket lies in the window (reads in time order)."""
    s = ThroughputStats(window=buckets * width, buckets=buckets)
    reads = sorted(reads)
    for t, n in reads:
        s.record("d", SCRATCH, n, t)
    now = max([probe] + [t for t, _ in reads])
    idx = int(now // width)
    expect = sum(n for t, n in reads if idx - buckets < int(t // width) <= idx)
    snap = s.snapshot(now)
    got = snap.datasets["d"].window_bytes if reads else 0
    assert got == expect
    assert (snap.datasets["d"].total_bytes if reads else 0) == sum(n for _, n in reads)


def test_runs_current_and_previous() -> None:
    s = ThroughputStats(window=60, buckets=6)
    for t in range(0, 30):
        s.record("a", SCRATCH, 100, float(t))
        s.record("a", CACHE, 10, float(t))
        if t % 5 == 0:
            s.snapshot(float(t))
    a = s.snapshot(30.0).datasets["a"]
    assert (a.run_bytes, a.last_run_bytes, a.runs) == (3300, 0, 0)  # both tiers count
    a = s.snapshot(100.0).datasets["a"]  # a window without reads: the run is over
    assert (a.run_bytes, a.last_run_bytes, a.runs, a.active_since) == (0, 3300, 1, None)
    for t in range(200, 210):
        s.record("a", SCRATCH, 7, float(t))
    a = s.snapshot(210.0).datasets["a"]
    assert (a.run_bytes, a.last_run_bytes, a.runs, a.active_since) == (70, 3300, 1, 200.0)
    assert a.total_bytes == 3300 + 70


def test_pauses_that_resume_are_told_from_pauses_that_end_the_run() -> None:
    """A run with no reads in its newest PAUSE_BUCKETS buckets is in a pause; reads again within
    the window count a pause resumed, a window without reads ends the run (a run, not a resume),
    and counts a return too if reads came again within RETURN_WINDOWS windows of the last one."""
    s = ThroughputStats(window=60, buckets=6)  # 10 s buckets

    def read(t0: int, t1: int) -> None:
        for t in range(t0, t1):
            s.record("a", SCRATCH, 100, float(t))
            s.snapshot(float(t))

    read(0, 30)
    assert s.snapshot(35.0).datasets["a"].resumed == 0  # one quiet bucket: no pause
    read(36, 40)
    for t in range(40, 75, 5):  # 35 s quiet, within the window: a pause...
        s.snapshot(float(t))
    assert s.snapshot(75.0).datasets["a"].resumed == 0
    read(75, 80)  # ...that ends with reads again
    a = s.snapshot(80.0).datasets["a"]
    assert (a.resumed, a.runs, a.active_since) == (1, 0, 0.0)
    for t in range(80, 150, 5):  # a window without reads: this pause ends the run
        s.snapshot(float(t))
    a = s.snapshot(150.0).datasets["a"]
    assert (a.resumed, a.runs, a.active_since) == (1, 1, None)
    read(200, 210)  # a new run, RETURN_WINDOWS windows after the last read: the run did end
    a = s.snapshot(210.0).datasets["a"]
    assert (a.resumed, a.runs, a.returns, a.last_run_bytes) == (1, 1, 0, 3900)
    for t in range(210, 280, 5):  # a window without reads ends this run too ...
        s.snapshot(float(t))
    assert s.snapshot(280.0).datasets["a"].runs == 2
    read(280, 285)  # ... but reads came again 70 s after the last one: a return
    a = s.snapshot(285.0).datasets["a"]
    assert (a.resumed, a.runs, a.returns, a.last_run_bytes, a.active_since) == (1, 2, 1, 1000, 280.0)
    assert PAUSE_BUCKETS == 3 and RETURN_WINDOWS == 2


def test_long_term_rate_follows_demand_and_decays_through_pauses() -> None:
    """Constant demand: the long-term rate tends to the rate; reads stopped: it decays with the
    time constant tau (LONG_WINDOWS windows), also while the snapshot reuses idle figures."""
    s = ThroughputStats(window=60, buckets=6)
    tau = LONG_WINDOWS * 60
    for t in range(0, 4000):
        s.record("a", SCRATCH, 1000, float(t))
        if t % 2 == 0:
            s.snapshot(float(t))
    snap = s.snapshot(4000.0)
    a = snap.datasets["a"]
    assert snap.tau == tau
    assert a.long_rate(4000.0, tau) == pytest.approx(1000, rel=0.01)
    later = s.snapshot(4000.0 + tau).datasets["a"]  # no reads for tau: window empty, run over
    assert later.window_bytes == 0 and later.runs == 1
    assert later.long_rate(4000.0 + tau, tau) == pytest.approx(1000 / math.e, rel=0.01)
    again = s.snapshot(4000.0 + 2 * tau).datasets["a"]  # the idle figures, reused
    assert again.long_rate(4000.0 + 2 * tau, tau) == pytest.approx(1000 / math.e**2, rel=0.01)


def test_idle_figures_follow_late_records() -> None:
    """An idle dataset's figures are reused between snapshots, but a late record still shows."""
    s = ThroughputStats(window=60, buckets=6)
    s.record("a", SCRATCH, 10, 1.0)
    s.snapshot(5.0)
    first = s.snapshot(500.0).datasets["a"]
    assert s.snapshot(600.0).datasets["a"] is first  # nothing changed: the same figures
    s.record("a", SCRATCH, 5, 2.0)  # a clock that went back: counts in the totals only
    again = s.snapshot(700.0).datasets["a"]
    assert again.total_bytes == 15 and again.total_requests == 2 and again.window_bytes == 0
    s.forget("a")
    assert "a" not in s.snapshot(800.0).datasets


@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.tuples(st.floats(0.1, 150), st.integers(0, 1000)), min_size=1, max_size=40))
def test_runs_match_brute_force(gaps: list[tuple[float, int]]) -> None:
    """Snapshots before and after each read: a run ends where a snapshot sees an empty window;
    it counts as finished, and as a return too if the next run's first read came less than
    RETURN_WINDOWS windows after the end of its last read's bucket."""
    s = ThroughputStats(window=60, buckets=6)
    reads: list[tuple[float, int]] = []
    runs: list[int] = []  # bytes of each run, brute force
    returned = 0  # runs followed by the next one within RETURN_WINDOWS windows
    ended: float | None = None
    in_run = False
    t = 0.0
    for gap, n in gaps:
        t += gap
        idx = int(t // 10)
        if in_run and not any(idx - 6 < int(rt // 10) <= idx and rn for rt, rn in reads):
            in_run = False
            ended = (int(max(rt for rt, _ in reads) // 10) + 1) * 10.0
        s.snapshot(t)
        s.record("d", SCRATCH, n, t)
        reads.append((t, n))
        s.snapshot(t)
        if n and not in_run:
            if ended is not None and idx * 10.0 - ended < RETURN_WINDOWS * 60:
                returned += 1
            ended = None
            runs.append(0)
            in_run = True
        if in_run:
            runs[-1] += n
    d = s.snapshot(t).datasets["d"]
    finished = runs[:-1] if in_run else runs
    assert d.run_bytes == (runs[-1] if in_run else 0)
    assert d.last_run_bytes == (finished[-1] if finished else 0)
    assert d.runs == len(finished)
    assert d.returns == returned
    assert d.total_bytes == sum(n for _, n in reads)
