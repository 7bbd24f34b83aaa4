"""The promotion policy: pure function, properties checked over generated inputs."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchfs.policy import (
    HORIZON_WINDOWS,
    ON_OFF_PAUSES,
    ON_OFF_SHARE,
    PRIOR_RAMP,
    RECOPIES,
    RUN_RATE_SHARE,
    WASTE,
    Demand,
    PolicyParams,
    best_subset,
    choose,
    copied_back,
    demand_from_snapshot,
    gives_way,
    on_and_off,
)
from scratchfs.stats import LONG_WINDOWS, RETURN_WINDOWS, SCRATCH, ThroughputStats

GiB = 1 << 30
NAMES = [f"d{i}" for i in range(8)]


@st.composite
def worlds(draw: st.DrawFn) -> dict:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8, unique=True))
    sizes = {n: draw(st.integers(0, 50 * GiB)) for n in names}
    demand = {
        n: Demand(
            rate=draw(st.floats(0, 2 * GiB)),
            recent_rate=draw(st.floats(0, 2 * GiB)),
            age=draw(st.floats(0, 20_000)),
            run_bytes=draw(st.none() | st.floats(0, 200 * GiB)),
            last_run_bytes=draw(st.floats(0, 200 * GiB)),
            idle=draw(st.sampled_from([0.0, 0.0, 30.0, 5000.0])),
        )
        for n in names
    }
    extra = draw(st.lists(st.sampled_from(["gone1", "gone2"]), unique=True))  # cached, image went away
    cached_names = draw(st.lists(st.sampled_from(names), unique=True)) + extra
    now = 100_000.0
    cached = {n: now - draw(st.floats(0, 5000)) for n in cached_names}
    return {
        "demand": demand,
        "sizes": sizes,
        "capacity": draw(st.integers(0, 120 * GiB)),
        "free": draw(st.integers(-10 * GiB, 150 * GiB)),
        "cached": cached,
        "pinned": set(draw(st.lists(st.sampled_from(names), unique=True, max_size=3))),
        "never_cache": set(draw(st.lists(st.sampled_from(names), unique=True, max_size=2))),
        "now": now,
        "params": PolicyParams(
            horizon=draw(st.sampled_from([60.0, 1200.0])),
            min_residency=draw(st.sampled_from([0.0, 600.0, 3000.0])),
            copy_bandwidth=draw(st.sampled_from([0.0, 100e6, 1e9])),
            hysteresis=draw(st.sampled_from([0.0, 0.1, 0.5])),
            spare=draw(st.booleans()),
        ),
    }


def budget_of(w: dict) -> int:
    cached_bytes = sum(w["sizes"][n] for n in w["cached"] if n in w["sizes"])
    return max(0, min(w["capacity"], cached_bytes + w["free"]))


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_never_over_capacity_or_free_space(w: dict) -> None:
    d = choose(**w)
    held = sum(w["sizes"][n] for n in d.hold)
    assert held <= w["capacity"]
    assert held <= budget_of(w) == d.budget
    # new copies fit in free space plus what the demotions release
    new = sum(w["sizes"][n] for n in d.promote)
    released = sum(w["sizes"][n] for n in d.demote if n in w["sizes"])
    assert new <= max(w["free"], 0) + released or new == 0


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_never_cache_and_unknown_never_held(w: dict) -> None:
    d = choose(**w)
    assert not (d.hold & w["never_cache"])
    assert d.hold <= set(w["sizes"])
    assert d.promote == d.hold - set(w["cached"])
    assert d.demote == set(w["cached"]) - d.hold


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_pins_held_when_they_fit(w: dict) -> None:
    d = choose(**w)
    pins = sorted(w["pinned"] - w["never_cache"])
    if sum(w["sizes"][p] for p in pins) <= d.budget:
        assert set(pins) <= d.hold
    else:
        # pins are taken first: a pin left out did not fit next to the pins that were taken
        taken = sum(w["sizes"][p] for p in pins if p in d.hold)
        for p in pins:
            if p not in d.hold:
                assert taken + w["sizes"][p] > d.budget


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_min_residency_respected(w: dict) -> None:
    """A dataset promoted less than min_residency ago stays, unless the budget cannot hold it."""
    d = choose(**w)
    p = w["params"]
    young = [n for n, since in w["cached"].items()
             if n in w["sizes"] and n not in w["never_cache"] and w["now"] - since < p.min_residency]
    forced = [n for n in young] + [n for n in w["pinned"] if n not in w["never_cache"]]
    if sum(w["sizes"][n] for n in set(forced)) <= d.budget:
        assert set(young) <= d.hold


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_stable_demand_converges_without_cycles(w: dict) -> None:
    """Constant demand: apply the decision, re-run; the held set settles and never revisits a set."""
    sizes = w["sizes"]
    cached = dict(w["cached"])
    used = sum(sizes[n] for n in cached if n in sizes)
    disk = used + w["free"]  # the cache filesystem's usable bytes stay constant
    now = w["now"]
    seen = []
    for _step in range(12):
        now += 10_000.0  # past any min_residency: only value decides
        cached = {n: t for n, t in cached.items() if n in sizes}
        used = sum(sizes[n] for n in cached)
        d = choose(**{**w, "cached": cached, "free": disk - used, "now": now})
        if seen and d.hold == seen[-1]:
            break
        assert d.hold not in seen, "policy went back to an earlier set under constant demand"
        seen.append(d.hold)
        cached = {n: cached.get(n, now) for n in d.hold}
    else:
        pytest.fail("no fixed point within 12 rounds")
    assert len(seen) <= 3


def test_read_once_is_not_promoted_but_rereads_are() -> None:
    """Rent-or-buy admission: a dataset must have been read about its size in this run."""
    params = PolicyParams(horizon=1200, copy_bandwidth=0, spare=False)
    size = 10 * GiB
    common = dict(sizes={"a": size}, capacity=100 * GiB, free=100 * GiB, cached={}, now=1000.0, params=params)
    half = Demand(rate=size / 2 / 100, age=100)  # half its size read in 100 s
    assert choose(demand={"a": half}, **common).hold == frozenset()
    twice = Demand(rate=2 * size / 100, age=100)  # twice its size in 100 s
    assert choose(demand={"a": twice}, **common).hold == {"a"}


def test_copy_time_counts_against_admission() -> None:
    """Reads during the copy still go to scratch: a run must outlast the copy by a size's worth."""
    size = 10 * GiB
    rate = size / 100  # its size in 100 s, read for 150 s so far
    demand = {"a": Demand(rate=rate, age=150, run_bytes=1.5 * size)}
    common = dict(sizes={"a": size}, capacity=100 * GiB, free=100 * GiB, cached={}, now=1000.0)
    assert choose(demand=demand, params=PolicyParams(copy_bandwidth=0, spare=False), **common).hold == {"a"}
    slow_copy = PolicyParams(copy_bandwidth=size / 60, spare=False)  # 60 s of copying: 1.5 - 0.6 < 1
    assert choose(demand=demand, params=slow_copy, **common).hold == frozenset()


def test_long_last_run_admits_the_next_run_at_once_but_a_scan_is_never_admitted() -> None:
    params = PolicyParams(horizon=1200, copy_bandwidth=500e6, spare=False)
    size = 50 * GiB
    common = dict(sizes={"a": size}, capacity=100 * GiB, free=100 * GiB, cached={}, now=1000.0, params=params)
    rate = 200e6
    starting = Demand(rate=rate, age=20, run_bytes=rate * 20)  # a run that began 20 s ago
    assert choose(demand={"a": starting}, **common).hold == frozenset()
    after_long = Demand(rate=rate, age=20, run_bytes=rate * 20, last_run_bytes=5 * size)
    d = choose(demand={"a": after_long}, **common)
    assert d.hold == {"a"} and d.reasons["a"] == "value"
    # a scan: the last run read the image once; this one is half-way through it
    scan = Demand(rate=rate, age=size / 2 / rate, run_bytes=size / 2, last_run_bytes=size)
    assert choose(demand={"a": scan}, **common).hold == frozenset()


def test_a_new_dataset_is_admitted_at_once_where_runs_are_long_but_not_where_they_are_scans() -> None:
    """A dataset without a finished run takes the other datasets' last runs as its prior."""
    params = PolicyParams(horizon=2400, copy_bandwidth=500e6, spare=False)
    size = 200 * GiB
    rate = 300e6
    new = Demand(rate=rate, age=60, run_bytes=rate * 60)  # began a minute ago: rent-or-buy says wait
    sizes = {"new": size, "o1": 20 * GiB, "o2": 30 * GiB, "o3": 40 * GiB}
    common = dict(sizes=sizes, capacity=300 * GiB, free=300 * GiB, cached={}, now=1e5, params=params)

    def others(times: float, n: int = 3) -> dict[str, Demand]:
        return {f"o{i}": Demand(last_run_bytes=times * sizes[f"o{i}"]) for i in range(1, n + 1)}

    assert choose(demand={"new": new}, **common).hold == frozenset()  # nothing known: wait
    d = choose(demand={"new": new, **others(4.0)}, **common)  # the others were read 4 times over
    assert d.hold == {"new"} and d.reasons["new"] == "value"
    assert choose(demand={"new": new, **others(1.0)}, **common).hold == frozenset()  # scans
    assert choose(demand={"new": new, **others(4.0, n=2)}, **common).hold == frozenset()  # too few known
    # the prior is how much a run reads, not only whether it is long: runs of 1.5 times their
    # size are long, but one of 1.5 × 200 GiB, 18 GB read and 129 GB more read during the copy,
    # would read less than its size from the copy
    assert choose(demand={"new": new, **others(1.5)}, **common).hold == frozenset()
    # before any run has ended: runs going on that already read 1.5 times their size count, with
    # what they have read
    going = {f"o{i}": Demand(rate=rate, age=3600, run_bytes=3 * sizes[f"o{i}"]) for i in (1, 2, 3)}
    assert "new" in choose(demand={"new": new, **going}, **common).hold
    # ... but runs going on that have read less are not known to be short (nor long) yet: with
    # one long run going and two shorter ones, too few runs are known
    short = {n: replace(d, run_bytes=sizes[n]) for n, d in going.items()}
    assert "new" not in choose(demand={"new": new, **short}, **common).hold
    assert "new" not in choose(demand={"new": new, **short, "o1": going["o1"]}, **common).hold
    # its own history beats the prior: its last run was a single pass
    once = replace(new, last_run_bytes=size)
    assert choose(demand={"new": once, **others(4.0)}, **common).hold == frozenset()
    # and a last run of 1.5 times its size admits it whatever the others did
    long_before = replace(new, last_run_bytes=1.5 * size)
    assert choose(demand={"new": long_before, **others(1.0)}, **common).hold == {"new"}


def test_spare_space_lent_to_runs_not_yet_admitted() -> None:
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=0)
    young = Demand(rate=size / 100, age=20)  # not admitted yet: read 20 % of its size
    sizes = {"new": size, "old": size}
    cached = {"old": 0.0}
    common = dict(sizes=sizes, cached=cached, now=1e5)
    paid = {"new": young, "old": Demand(last_run_bytes=3 * size)}  # idle; its last run paid for its copy
    loan = {"new": young, "old": Demand(last_run_bytes=size / 2)}  # idle; its last run did not
    # room for both: the young run gets the spare space, the idle incumbent stays
    for demand in (paid, loan, {"new": young}):
        d = choose(demand=demand, capacity=20 * GiB, free=10 * GiB, params=params, **common)
        assert d.hold == {"new", "old"} and d.reasons == {"old": "kept", "new": "spare"}
    # room for one: an idle incumbent whose last run paid for its copy keeps its place while
    # that run is still in the window ...
    recent = {"new": young, "old": Demand(rate=size / 1000, age=600, last_run_bytes=3 * size, idle=300)}
    d = choose(demand=recent, capacity=10 * GiB, free=0, params=params, **common)
    assert d.hold == {"old"} and not d.promote
    # ... and gives it to a dataset being read once its reads have left the window
    d = choose(demand=paid, capacity=10 * GiB, free=0, params=params, **common)
    assert d.hold == {"new"} and d.demote == {"old"} and d.reasons["new"] == "spare"
    # ... one that never paid for it (or was never read) gives it back to a dataset being read
    for demand in (loan, {"new": young}):
        d = choose(demand=demand, capacity=10 * GiB, free=0, params=params, **common)
        assert d.hold == {"new"} and d.demote == {"old"} and d.reasons["new"] == "spare"
    # but not while it is within min_residency
    resident = PolicyParams(horizon=1200, copy_bandwidth=0, min_residency=600)
    d = choose(demand=loan, sizes=sizes, cached={"old": 1e5 - 10}, now=1e5, capacity=10 * GiB, free=0, params=resident)
    assert d.hold == {"old"}
    # spare off: only admitted datasets are copied, idle ones stay
    off = PolicyParams(horizon=1200, copy_bandwidth=0, spare=False)
    for capacity, free in ((20 * GiB, 10 * GiB), (10 * GiB, 0)):
        d = choose(demand=loan, capacity=capacity, free=free, params=off, **common)
        assert d.hold == {"old"}
    # a copy that would finish after the horizon serves nothing: no spare space for it
    slow = PolicyParams(horizon=1200, copy_bandwidth=size / 2000)
    d = choose(demand=loan, capacity=20 * GiB, free=10 * GiB, params=slow, **common)
    assert d.hold == {"old"}


def test_copies_are_queued_most_wanted_first() -> None:
    """Valued datasets by value per byte, then spare space by expected cache bytes per byte:
    never by name."""
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=0)
    sizes = {"a_slow": size, "b_fast": size, "c_long": size, "d_longer": size, "e_older": size}
    demand = {
        "a_slow": Demand(rate=size / 1000, age=20),  # not admitted yet: spare space
        "b_fast": Demand(rate=size / 200, age=20),  # not admitted yet, read 5 x faster
        "e_older": Demand(rate=size / 1000, age=600),  # as slow, but read for 10 min: lasts longer
        "c_long": Demand(rate=size / 100, age=20, last_run_bytes=3 * size),  # admitted
        "d_longer": Demand(rate=size / 50, age=20, last_run_bytes=3 * size),  # admitted, faster
    }
    d = choose(demand=demand, sizes=sizes, capacity=5 * size, free=5 * size, cached={}, now=1e5, params=params)
    assert d.queue == ("d_longer", "c_long", "e_older", "b_fast", "a_slow")
    assert set(d.queue) == d.promote
    assert [d.reasons[n] for n in d.queue] == ["value", "value", "spare", "spare", "spare"]


def test_hysteresis_keeps_incumbent_against_a_similar_challenger() -> None:
    params = PolicyParams(horizon=1200, copy_bandwidth=0, hysteresis=0.1)
    sizes = {"old": 10 * GiB, "new": 10 * GiB}
    rate = 100e6
    demand = {"old": Demand(rate=rate, recent_rate=rate, age=5000), "new": Demand(rate=rate * 1.05, age=5000)}
    d = choose(demand=demand, sizes=sizes, capacity=10 * GiB, free=0, cached={"old": 0.0}, now=9000.0, params=params)
    assert d.hold == {"old"}
    demand["new"] = Demand(rate=rate * 3, age=5000)
    d = choose(demand=demand, sizes=sizes, capacity=10 * GiB, free=0, cached={"old": 0.0}, now=9000.0, params=params)
    assert d.hold == {"new"} and d.demote == {"old"}


def test_a_run_winding_down_gives_its_place_up() -> None:
    """An incumbent is valued at its recent rate, not below ``held_floor`` times its window
    rate: a run slowing down gives its place to a faster one before its past reads leave the
    window, and a lull costs it at most that share."""
    params = PolicyParams(horizon=1200, copy_bandwidth=0, hysteresis=0.4, copy_charge=0.5, held_floor=0.5)
    size = 10 * GiB
    rate = 100e6
    common = dict(sizes={"old": size, "new": size}, capacity=size, free=0, cached={"old": 0.0}, now=9000.0)
    new = Demand(rate=1.5 * rate, recent_rate=1.5 * rate, age=5000)
    steady = Demand(rate=rate, recent_rate=rate, age=5000)
    d = choose(demand={"old": steady, "new": new}, params=params, **common)
    assert d.hold == {"old"}  # 1.4 r H + size beats 1.5 r H - size / 2
    slowing = replace(steady, recent_rate=0.6 * rate)
    d = choose(demand={"old": slowing, "new": new}, params=params, **common)
    assert d.hold == {"new"} and d.demote == {"old"}
    # ... but never below what it would be worth as a candidate (read now, its run is long)
    held = 0.6 * rate * 1200 * 1.4 + size
    assert held < rate * 1200 - size / 2 and d.value["old"] == pytest.approx(rate * 1200 - size / 2)
    stopped = replace(slowing, idle=60.0)  # not read for a minute: no candidate value
    d = choose(demand={"old": stopped, "new": new}, params=params, **common)
    assert d.hold == {"new"} and d.value["old"] == pytest.approx(0.6 * rate * 1200 * 1.4)
    lull = replace(steady, recent_rate=0.0, idle=200.0)  # no reads in the newest part of the window
    d = choose(demand={"old": lull, "new": new}, params=params, **common)
    assert d.value["old"] == pytest.approx(0.5 * rate * 1200 * 1.4)
    # held_floor=1 values an incumbent at its window rate, however its reads slow down
    flat = replace(params, held_floor=1.0)
    assert choose(demand={"old": slowing, "new": new}, params=flat, **common).hold == {"old"}
    with pytest.raises(ValueError):
        PolicyParams(held_floor=1.5)


def test_an_incumbent_in_the_middle_of_a_run_is_worth_its_copy() -> None:
    """Demoting a dataset being read gives up a copy its run may want back: it is worth its size
    more than one whose reads stopped (no more than its run is expected to read from now on),
    and a challenger must beat that as well."""
    params = PolicyParams(horizon=1200, copy_bandwidth=0, hysteresis=0.2, copy_charge=0.5)
    size = 10 * GiB
    sizes = {"old": size, "new": size}
    rate = 100e6
    # old: rate * H * 1.2 = 144e9, + its size while read; new at 1.25 x: 150e9 - size / 2
    new = Demand(rate=1.25 * rate, age=5000)
    common = dict(sizes=sizes, capacity=size, free=0, cached={"old": 0.0}, now=9000.0, params=params)
    reading = Demand(rate=rate, recent_rate=rate, age=5000)  # read at a steady rate
    d = choose(demand={"old": reading, "new": new}, **common)
    assert d.hold == {"old"}
    assert d.value["old"] == pytest.approx(rate * 1200 * 1.2 + size)
    assert d.value["new"] == pytest.approx(1.25 * rate * 1200 - size / 2)
    stopped = replace(reading, idle=120)  # the same rate in the window, but no reads for 2 min
    d = choose(demand={"old": stopped, "new": new}, **common)
    assert d.hold == {"new"} and d.demote == {"old"}
    # charged its whole size, the challenger no longer beats even the stopped incumbent
    full = replace(params, copy_charge=1.0)
    assert choose(demand={"old": stopped, "new": new}, **{**common, "params": full}).hold == {"old"}
    # A run that began 50 s ago is expected to read 5 GB more (as long again): less than the
    # size, so that is what its copy is worth beyond its rate.  A challenger at 1.3 x (156e9 -
    # size / 2) beats that, but not the incumbent of a long run.
    faster = Demand(rate=1.3 * rate, age=5000)
    short = replace(reading, age=50)
    d = choose(demand={"old": short, "new": faster}, **common)
    assert d.value["old"] == pytest.approx(rate * 1200 * 1.2 + rate * 50)
    assert d.hold == {"new"} and d.demote == {"old"}
    assert choose(demand={"old": reading, "new": faster}, **common).hold == {"old"}


def test_a_kept_copy_is_served_again_without_a_copy_charge() -> None:
    """A candidate whose copy is still on the disk (reclaimable) needs no copy: no copy time,
    no copy charge; its bytes count in ``free``."""
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=100e6, copy_charge=0.5)
    d_new = Demand(rate=100e6, age=5000)
    common = dict(sizes={"x": size}, capacity=size, free=size, cached={}, now=1e4, params=params)
    copied = choose(demand={"x": d_new}, **common)
    kept = choose(demand={"x": d_new}, reclaimable={"x"}, **common)
    assert copied.value["x"] == pytest.approx(100e6 * (1200 - size / 100e6) - size / 2)
    assert kept.value["x"] == pytest.approx(100e6 * 1200)
    assert kept.hold == {"x"} and kept.queue == ("x",)


def test_idle_incumbent_kept_while_space_is_not_wanted() -> None:
    params = PolicyParams()
    d = choose(demand={}, sizes={"a": GiB}, capacity=10 * GiB, free=9 * GiB, cached={"a": 0.0}, now=1e6, params=params)
    assert d.hold == {"a"} and d.reasons["a"] == "kept"


def test_idle_incumbents_read_most_per_byte_keep_their_places_longest() -> None:
    """Of idle incumbents whose last runs paid for their copies, the one whose last run read it
    the most times over stays when a run being read needs space, however recently the other
    was promoted."""
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=0)
    sizes = {"often": size, "twice": size, "new": size}
    demand = {
        "often": Demand(last_run_bytes=40 * size),
        "twice": Demand(last_run_bytes=2 * size),
        "new": Demand(rate=size / 100, age=20),  # being read, not admitted yet: spare space
    }
    for cached in ({"often": 0.0, "twice": 50.0}, {"often": 50.0, "twice": 0.0}):
        d = choose(demand=demand, sizes=sizes, capacity=2 * size, free=0, cached=cached, now=1e5, params=params)
        assert d.hold == {"often", "new"} and d.demote == {"twice"}


def test_a_copy_gives_way_to_a_dataset_read_much_faster() -> None:
    """Smith's rule with a price on the bytes thrown away (see gives_way)."""
    MiB = 1 << 20
    bw = 500 * MiB
    big, small = 100 * GiB, 10 * GiB
    slow = Demand(rate=100 * MiB, recent_rate=100 * MiB, age=600)
    fast = Demand(rate=400 * MiB, recent_rate=400 * MiB, age=600)
    lots = 1000 * GiB  # what the waiting one is expected to serve once copied: not a limit here
    # just started: the fast one's reads over the 200 s the big copy needs are worth far more
    # than the slow one's over the 20 s the small copy takes
    assert gives_way(slow, big, 0, fast, small, lots, bw)
    # with 10 s to go, or after 50 GiB copied (worth twice that): no
    assert not gives_way(slow, big, big - 5 * GiB, fast, small, lots, bw)
    assert not gives_way(slow, big, 50 * GiB, fast, small, lots, bw)
    # the other way round, a slow large dataset never stops a fast small one's copy
    assert not gives_way(fast, small, 0, slow, big, lots, bw)
    # no measured copy rate, nothing known of the waiting one's reads: no
    assert not gives_way(slow, big, 0, fast, small, lots, 0.0)
    assert not gives_way(slow, big, 0, None, small, lots, bw)
    assert not gives_way(slow, big, 0, Demand(), small, lots, bw)
    # a running copy with no demand left gives way to anything read
    assert gives_way(None, big, 0, slow, small, lots, bw)
    # a run not expected to read much once copied (a scan, say) gains little by going first
    assert not gives_way(slow, big, 0, fast, small, 1 * GiB, bw)


def test_choose_says_what_each_candidate_is_expected_to_serve() -> None:
    """Decision.expected, the bound gives_way puts on a waiting dataset's gain: an admitted
    candidate's bytes over the horizon after its copy; one not admitted (spare space) no more
    than its run is expected to read once copied."""
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=size / 100)
    rate = size / 50
    demand = {
        "long": Demand(rate=rate, recent_rate=rate, age=20, last_run_bytes=5 * size),  # admitted
        "young": Demand(rate=rate, recent_rate=rate, age=120),  # 0.4 sizes after its copy: spare
    }
    sizes = {"long": size, "young": size}
    d = choose(demand=demand, sizes=sizes, capacity=4 * size, free=4 * size, cached={}, now=1e5, params=params)
    assert d.reasons == {"long": "value", "young": "spare"}
    assert d.expected["long"] == pytest.approx(rate * (1200 - 100))
    assert d.expected["young"] == pytest.approx(rate * 120 - rate * 100)  # rate * age, less the copy time


@settings(max_examples=300, deadline=None)
@given(
    st.floats(1e6, 2e9), st.floats(1e6, 2e9), st.integers(GiB, 300 * GiB), st.integers(GiB, 300 * GiB),
    st.floats(0, 1), st.floats(1e8, 2e9), st.floats(0, 1e14), st.floats(0, 1e14),
)  # fmt: skip
def test_a_copy_that_took_over_never_gives_way_back(
    ra: float, rb: float, sa: int, sb: int, f: float, bw: float, ea: float, eb: float
) -> None:
    """Under constant rates: if a's copy gave way to b's, then b's, once started, never gives
    way to a's (copied again from its start), whatever either is expected to serve, so copies
    do not go back and forth."""
    a, b = Demand(rate=ra, recent_rate=ra), Demand(rate=rb, recent_rate=rb)
    done = int(f * sa)
    if gives_way(a, sa, done, b, sb, eb, bw):
        for done_b in (0, sb // 3, sb - 1):
            assert not gives_way(b, sb, done_b, a, sa, ea, bw)
    assert WASTE >= 1  # a cancelled copy costs at least the bytes it read


def test_free_space_shrinking_forces_demotion() -> None:
    params = PolicyParams()
    sizes = {"a": 6 * GiB, "b": 4 * GiB}
    demand = {"a": Demand(rate=1e9, age=1e4), "b": Demand(rate=1e6, age=1e4)}
    # someone else filled the SSD: only 7 GiB of (cached + free) remains
    d = choose(demand=demand, sizes=sizes, capacity=20 * GiB, free=-3 * GiB, cached={"a": 0.0, "b": 0.0}, now=1e5, params=params)
    assert d.budget == 7 * GiB
    assert d.hold == {"a"} and d.demote == {"b"}


def test_a_new_dataset_admitted_by_the_prior_is_valued_at_what_the_prior_expects() -> None:
    """A dataset nobody has seen run, read fast: the prior says how much its run reads, so it is
    not valued at its rate over the whole horizon and does not displace a dataset in the middle
    of a run it reads many times over."""
    params = PolicyParams(horizon=2400, copy_bandwidth=500e6, spare=False)
    size = 10 * GiB
    sizes = {"new": size, "inc": size, "o1": size, "o2": size, "o3": size}
    others = {f"o{i}": Demand(last_run_bytes=4 * size) for i in (1, 2, 3)}  # runs here read 4× their size
    new = Demand(rate=1e9, age=5, run_bytes=5e9)  # ten times the incumbent's rate, 5 s old
    inc = Demand(rate=1e8, recent_rate=1e8, age=3600, run_bytes=3.6e11, last_run_bytes=2 * size)
    common = dict(sizes=sizes, capacity=15 * GiB, free=5 * GiB, cached={"inc": 0.0}, now=1e5, params=params)
    d = choose(demand={"new": new, "inc": inc, **others}, **common)
    assert d.hold == {"inc"}
    copy_time = size / 500e6
    expect = 4 * size - 5e9 - 1e9 * copy_time  # what the prior says its run reads once copied
    assert d.expected["new"] == pytest.approx(expect) and expect > size  # admitted, at that
    assert d.value["new"] == pytest.approx(expect - params.copy_charge * size)
    # with the room, it is copied
    assert choose(demand={"new": new, **others}, **{**common, "capacity": 30 * GiB, "free": 30 * GiB, "cached": {}}).hold == {"new"}


def test_a_burst_admitted_by_the_prior_counts_only_the_reads_it_has_shown() -> None:
    """A new dataset read for a minute, three times as fast as an incumbent paused between two
    jobs of a long run (a scan of a small image looks like that), is valued at its bytes so far
    spread over PRIOR_RAMP of the horizon, not at its rate: it does not displace the incumbent.
    Read that fast for that long, it does."""
    params = PolicyParams(horizon=2400, copy_bandwidth=500e6, spare=False)
    size = 10 * GiB
    sizes = {"new": size, "inc": size, "o1": size, "o2": size, "o3": size}
    others = {f"o{i}": Demand(last_run_bytes=60 * size) for i in (1, 2, 3)}  # runs here read 60× their size
    inc = Demand(rate=1e7, recent_rate=1e7, age=3600, run_bytes=3.6e10, idle=30)
    common = dict(sizes=sizes, capacity=15 * GiB, free=5 * GiB, cached={"inc": 0.0}, now=1e5, params=params)
    copy_time = size / 500e6
    full = PRIOR_RAMP * params.horizon
    young = Demand(rate=3e7, recent_rate=3e7, age=60, run_bytes=3e7 * 60)
    assert young.after_copy(copy_time) <= size  # its own run does not admit it: the prior does
    d = choose(demand={"new": young, "inc": inc, **others}, **common)
    assert d.hold == {"inc"}
    shown = 3e7 * (params.horizon - copy_time) * 60 / full
    assert shown < 60 * size - 3e7 * (60 + copy_time)  # below what the prior expects its run to read
    assert d.value["new"] == pytest.approx(shown - params.copy_charge * size)
    old = Demand(rate=3e7, recent_rate=3e7, age=full, run_bytes=3e7 * full)
    assert old.after_copy(copy_time) <= size
    d = choose(demand={"new": old, "inc": inc, **others}, **common)
    assert d.hold == {"new"} and d.demote == {"inc"}
    # with the room, the burst is copied at once all the same
    room = {**common, "capacity": 30 * GiB, "free": 30 * GiB, "cached": {}}
    assert choose(demand={"new": young, **others}, **room).hold == {"new"}
    # read for seconds only, its value is below its copy charge yet: with room it is copied as
    # spare space
    burst = Demand(rate=3e7, recent_rate=3e7, age=5, run_bytes=3e7 * 5)
    d = choose(demand={"new": burst, **others}, **{**room, "params": replace(params, spare=True)})
    assert d.value["new"] <= 0 and d.hold == {"new"} and d.reasons["new"] == "spare"


def test_on_and_off_is_learnt_from_the_pauses_of_the_datasets_being_read() -> None:
    n = ON_OFF_PAUSES
    k = math.floor(ON_OFF_SHARE * 2 * n) + 1  # of 2n pauses, the fewest resumed that are more than the share
    on = Demand(rate=1e8, resumed=k, runs=2 * n - k)
    assert on_and_off({"a": on})
    assert on_and_off({"a": Demand(rate=1e8, resumed=n)})  # every pause resumed
    assert not on_and_off({"a": Demand(rate=1e8, resumed=n - 1)})  # too few pauses to tell
    assert not on_and_off({"a": Demand(rate=1e8, resumed=k - 1, runs=2 * n - k + 1)})  # not more than the share
    assert not on_and_off({"a": on, "b": Demand(rate=1e6, runs=2 * n)})  # pooled: k of 4n
    assert on_and_off({"a": on, "b": Demand(last_run_bytes=1, runs=2 * n)})  # not being read: not counted
    assert not on_and_off({})


def test_where_reads_are_on_and_off_a_paused_incumbent_keeps_its_run_rate_and_no_prior_is_used() -> None:
    """A hot dataset between two of its jobs: where pauses have mostly ended with reads again, it
    is valued at RUN_RATE_SHARE of its run's mean rate and keeps its place against a dataset read
    a little faster than half of that; where they have mostly ended runs, it gives its place up.
    There, too, a new dataset is not copied on the strength of the others' runs."""
    params = PolicyParams(horizon=1200, copy_bandwidth=0, spare=False)
    size = 10 * GiB
    inc = dict(rate=1e8, recent_rate=0.0, age=3000, run_bytes=3e11, idle=30)  # mean 1e8/s, paused
    cand = Demand(rate=8e7, recent_rate=8e7, age=600)  # its run so far says long
    common = dict(sizes={"inc": size, "cand": size}, capacity=15 * GiB, free=5 * GiB, cached={"inc": 0.0}, now=1e5, params=params)
    on = choose(demand={"inc": Demand(**inc, resumed=ON_OFF_PAUSES), "cand": cand}, **common)
    assert on.hold == {"inc"}
    assert on.value["inc"] == pytest.approx(RUN_RATE_SHARE * 1e8 * 1200 * (1 + params.hysteresis))
    off = choose(demand={"inc": Demand(**inc, resumed=1, runs=ON_OFF_PAUSES), "cand": cand}, **common)
    assert off.hold == {"cand"} and off.demote == {"inc"}
    # the prior: runs of others read 4× their size; a new dataset read fast is not admitted
    others = {f"o{i}": Demand(last_run_bytes=4 * size) for i in (1, 2, 3)}
    new = Demand(rate=1e9, recent_rate=1e9, age=5, run_bytes=5e9)
    sizes = {"new": size, "o1": size, "o2": size, "o3": size, "inc": size}
    room = dict(sizes=sizes, capacity=50 * GiB, free=50 * GiB, cached={}, now=1e5, params=params)
    assert choose(demand={"new": new, **others, "inc": Demand(**inc, resumed=1, runs=ON_OFF_PAUSES)}, **room).hold == {"new"}
    assert choose(demand={"new": new, **others, "inc": Demand(**inc, resumed=ON_OFF_PAUSES)}, **room).hold == set()


def test_an_incumbent_read_on_and_off_and_copied_back_is_valued_at_its_long_term_rate() -> None:
    """A dataset between two of its jobs, for longer than the window (no reads in it): if it was
    copied back soon after a demotion RECOPIES times and its own pauses have more often ended
    with reads again than not, it is valued at its long-term rate and keeps its place against a
    dataset being read a little slower than that; if either is not so, it is worth nothing and
    gives its place up.  A candidate's long-term rate counts for nothing: it is valued at what
    it is read at now."""
    params = PolicyParams(horizon=1200, copy_bandwidth=0, spare=False)
    size = 10 * GiB
    paused = dict(last_run_bytes=5e11, idle=700, long_rate=1e8)  # between jobs
    cand = Demand(rate=9e7, recent_rate=9e7, age=600, long_rate=1e9)  # its run so far says long
    common = dict(sizes={"inc": size, "cand": size}, capacity=15 * GiB, free=5 * GiB, cached={"inc": 0.0}, now=1e5, params=params)
    back = {"inc": RECOPIES, "cand": 5}
    # its pauses resumed more often than they ended its runs; or its runs mostly ended with
    # reads again soon (returns: counted in runs, and as resumed pauses here)
    for inc in (Demand(**paused, resumed=3, runs=2), Demand(**paused, resumed=1, runs=3, returns=2)):
        on = choose(demand={"inc": inc, "cand": cand}, recopied=back, **common)
        assert on.hold == {"inc"}
        assert on.value["inc"] == pytest.approx(1e8 * 1200 * (1 + params.hysteresis))
        assert on.value["cand"] == pytest.approx(9e7 * 1200 - params.copy_charge * size)
    for inc, recopied in [(Demand(**paused, resumed=2, runs=2), back),  # as many runs ended
                          (Demand(**paused, resumed=1, runs=3, returns=1), back),  # returns, but as many ended
                          (Demand(**paused, resumed=3, runs=2), {"inc": RECOPIES - 1}),  # not copied back enough
                          (Demand(**paused, resumed=3, runs=2), None)]:  # fmt: skip
        off = choose(demand={"inc": inc, "cand": cand}, recopied=recopied, **common)
        assert off.hold == {"cand"} and off.demote == {"inc"}


def test_an_incumbent_paused_in_a_run_whose_pauses_resume_keeps_its_copy_worth_for_a_while() -> None:
    """An incumbent paused for a minute in the middle of a long run keeps what its copy is
    worth to that run (its size) less the share of the window it has been paused, if its own
    pauses have more often ended with reads again than ended its runs: it keeps its place
    against a dataset read a little faster than its held rate.  Not so if its runs mostly end
    at a pause, nor once the pause nears a window, nor where reads are on and off (the run's
    mean rate values it there)."""
    params = PolicyParams(horizon=1200, window=600, copy_bandwidth=0, spare=False)
    size = 10 * GiB
    run = dict(rate=1e8, recent_rate=0.0, age=600, run_bytes=6e10, last_run_bytes=5e10)  # paused
    cand = Demand(rate=7.8e7, recent_rate=7.8e7, age=600)  # its run so far says long
    common = dict(sizes={"inc": size, "cand": size}, capacity=15 * GiB, free=5 * GiB, cached={"inc": 0.0}, now=1e5, params=params)
    held = 0.5 * 1e8 * 1200 * (1 + params.hysteresis)  # held_floor × its window rate
    cand_value = 7.8e7 * 1200 - params.copy_charge * size
    assert held < cand_value < held + size
    resumes = Demand(**run, idle=60, runs=1, returns=1)  # its last run ended with reads again soon
    d = choose(demand={"inc": resumes, "cand": cand}, **common)
    assert d.hold == {"inc"}
    assert d.value["inc"] == pytest.approx(held + (1 - 60 / 600) * size)
    assert d.value["cand"] == pytest.approx(cand_value)
    for inc in (Demand(**run, idle=60, runs=2, resumed=1),  # its pauses mostly ended its runs
                replace(resumes, idle=540)):  # paused for most of a window
        d = choose(demand={"inc": inc, "cand": cand}, **common)
        assert d.hold == {"cand"} and d.demote == {"inc"}
    # reads on and off here (another dataset's pauses): valued at its run's mean rate, no more
    on_off = choose(demand={"inc": resumes, "cand": cand, "other": Demand(rate=1e6, resumed=ON_OFF_PAUSES)}, **common)
    assert on_off.value["inc"] == pytest.approx(RUN_RATE_SHARE * 1e8 * 1200 * (1 + params.hysteresis))
    # mountd's params for a window: the horizon is HORIZON_WINDOWS windows
    assert PolicyParams.for_window(30.0, spare=False) == PolicyParams(horizon=HORIZON_WINDOWS * 30.0, window=30.0, spare=False)
    # the window the pause is measured against must be positive
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            PolicyParams(window=bad)


def test_copied_back() -> None:
    assert copied_back(1000.0, 1000.0 + RETURN_WINDOWS * 600 - 1, 600)
    assert not copied_back(1000.0, 1000.0 + RETURN_WINDOWS * 600, 600)
    assert not copied_back(None, 1000.0, 600)


def test_demand_from_snapshot() -> None:
    s = ThroughputStats(window=600, buckets=60)
    for t in range(300, 400):
        s.record("a", SCRATCH, 1_000_000, float(t))
    s.record("idle", SCRATCH, 5, 1.0)
    snap = s.snapshot(400.0)
    dem = demand_from_snapshot(snap)["a"]
    assert dem.age == pytest.approx(100.0)
    assert dem.rate == pytest.approx(1e6)  # rate while active, not diluted over the window
    assert dem.run == 100_000_000
    assert demand_from_snapshot(snap)["idle"].run == 5
    later = demand_from_snapshot(s.snapshot(1000.0))  # nothing in the window: the last run ...
    # ... and the long-term rate: what the snapshot at 400 s counted, decayed over 600 s
    decay = math.exp(-600 / (LONG_WINDOWS * 600)) / (LONG_WINDOWS * 600)
    assert later == {"a": Demand(last_run_bytes=100_000_000, idle=1000 - 10 - 400, runs=1, long_rate=pytest.approx(1e8 * decay)),
                     "idle": Demand(last_run_bytes=5, idle=1000 - 10 - 10, runs=1, long_rate=pytest.approx(5 * decay))}  # fmt: skip
    s.record("never", SCRATCH, 7, 1001.0)  # read, but no snapshot saw it in a run
    assert "never" not in demand_from_snapshot(s.snapshot(1700.0))


def test_demand_scaled_to_image_bytes() -> None:
    """Served (decompressed) bytes times image/logical size: compared with image sizes."""
    s = ThroughputStats(window=600, buckets=60)
    for t in range(0, 100):
        s.record("a", SCRATCH, 1_000_000, float(t))
    s.snapshot(100.0)  # a run starts
    assert s.snapshot(700.0).datasets["a"].last_run_bytes == 100_000_000  # a window without reads ends it
    for t in range(700, 760):
        s.record("a", SCRATCH, 2_000_000, float(t))
    snap = s.snapshot(760.0)  # the next run
    plain = demand_from_snapshot(snap)["a"]
    half = demand_from_snapshot(snap, {"a": 0.5, "other": 3.0})["a"]
    assert half.rate == pytest.approx(plain.rate / 2) and half.recent_rate == pytest.approx(plain.recent_rate / 2)
    assert half.run == pytest.approx(plain.run / 2)
    assert half.last_run_bytes == pytest.approx(plain.last_run_bytes / 2)
    assert half.age == plain.age


def test_compression_ratio_changes_the_decision() -> None:
    """4 GiB served from an image compressed 4:1 is one image size of traffic, not four."""
    size = 2 * GiB
    params = PolicyParams(copy_bandwidth=0, spare=False)
    s = ThroughputStats(window=600, buckets=60)
    for t in range(0, 100):
        s.record("a", SCRATCH, 4 * GiB // 100, float(t))  # twice its image size served in 100 s
    snap = s.snapshot(100.0)
    common = dict(sizes={"a": size}, capacity=10 * GiB, free=10 * GiB, cached={}, now=100.0, params=params)
    assert choose(demand=demand_from_snapshot(snap), **common).hold == {"a"}
    assert choose(demand=demand_from_snapshot(snap, {"a": 0.25}), **common).hold == frozenset()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1000), st.floats(-5, 100)), min_size=0, max_size=9),
    st.integers(0, 3000),
)
def test_best_subset_exact_and_optimal_for_small_inputs(items: list[tuple[int, float]], budget: int) -> None:
    named = [(f"i{k}", s, v) for k, (s, v) in enumerate(items)]
    got = best_subset(named, budget)
    sizes = {n: s for n, s, _ in named}
    vals = {n: v for n, _, v in named}
    assert sum(sizes[n] for n in got) <= budget
    assert all(vals[n] > 0 for n in got)
    best = 0.0
    for r in range(len(named) + 1):
        for comb in itertools.combinations(named, r):
            if sum(c[1] for c in comb) <= budget:
                best = max(best, sum(c[2] for c in comb if c[2] > 0))
    assert sum(vals[n] for n in got) == pytest.approx(best)


def test_next_run_of_a_long_read_dataset_is_admitted_from_stats() -> None:
    """Through the stats: same reads now, but only the dataset whose last run was long is copied."""
    s = ThroughputStats(window=60, buckets=6)
    size = 1000
    for t in range(0, 300):
        s.record("long", SCRATCH, 5 * size // 300, float(t))  # five times its size
        s.record("short", SCRATCH, size // 2 // 300, float(t))  # half its size
        if t % 2 == 0:
            s.snapshot(float(t))
    for t in range(300, 1000, 2):
        s.snapshot(float(t))  # a pause longer than the window ends both runs
    for t in range(1000, 1006):  # a new run of each: 100 bytes/s, 10 % of a size so far
        s.record("long", SCRATCH, 100, float(t))
        s.record("short", SCRATCH, 100, float(t))
        s.snapshot(float(t))
    snap = s.snapshot(1006.0)
    assert snap.datasets["long"].last_run_bytes >= 5 * size - 300 and snap.datasets["short"].runs == 1
    params = PolicyParams(horizon=120, copy_bandwidth=0, spare=False)
    d = choose(demand=demand_from_snapshot(snap), sizes={"long": size, "short": size}, capacity=10 * size,
               free=10 * size, cached={}, now=1006.0, params=params)  # fmt: skip
    assert d.hold == {"long"}


def test_stats_and_demand_say_how_long_a_dataset_has_not_been_read() -> None:
    """``last_read`` is the end of the newest bucket with reads (at most now); the demand's
    ``idle`` is 0 while reads are in the newest bucket or the one before it."""
    s = ThroughputStats(window=600, buckets=60)  # 10 s buckets
    for t in range(100, 131, 5):
        s.record("a", SCRATCH, 1000, float(t))  # last read at 130 s, bucket [130, 140)
    s.record("b", SCRATCH, 1000, 100.0)
    snap = s.snapshot(135.0)
    assert snap.datasets["a"].last_read == 135.0 and snap.datasets["b"].last_read == 110.0
    dem = demand_from_snapshot(snap)
    assert dem["a"].idle == 0.0  # being read
    assert dem["b"].idle == pytest.approx(15.0)  # 135 - 10 (a bucket) - 110
    assert demand_from_snapshot(s.snapshot(145.0))["a"].idle == 0.0  # the previous bucket still counts
    assert demand_from_snapshot(s.snapshot(175.0))["a"].idle == pytest.approx(25.0)
    assert demand_from_snapshot(s.snapshot(175.0))["a"].rate > 0  # still a rate in the window


def test_spare_space_only_for_runs_still_going() -> None:
    """A dataset whose reads stopped keeps a rate for a window; it gets no spare space (its copy
    would serve nothing to the run that is over), the same dataset still being read does."""
    size = 10 * GiB
    params = PolicyParams(horizon=1200, copy_bandwidth=1e9)
    common = dict(sizes={"a": size}, capacity=100 * GiB, free=100 * GiB, cached={}, now=1e5, params=params)
    reading = Demand(rate=size / 100, age=20)  # not admitted: 20 % of its size read so far
    d = choose(demand={"a": reading}, **common)
    assert d.hold == {"a"} and d.reasons["a"] == "spare"
    stopped = Demand(rate=size / 100, age=20, idle=30.0)
    assert choose(demand={"a": stopped}, **common).hold == frozenset()
    # nor is a dataset that would be admitted for value: its run is over
    admitted = Demand(rate=size / 100, age=500)
    assert choose(demand={"a": admitted}, **common).reasons == {"a": "value"}
    assert choose(demand={"a": replace(admitted, idle=30.0)}, **common).hold == frozenset()
    # once cached, a pause in its reads changes nothing
    held = choose(demand={"a": replace(admitted, idle=30.0)}, **{**common, "cached": {"a": 0.0}})
    assert held.hold == {"a"} and held.reasons["a"] == "value"
