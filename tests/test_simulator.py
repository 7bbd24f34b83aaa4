"""Trace simulator and trace format: structural invariants and hand-checked small cases (no timing)."""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
from pathlib import Path

import pytest

from scratchfs.errors import ScratchfsError, UsageError
from scratchfs.policy import PolicyParams, demand_from_snapshot
from scratchfs.stats import SCRATCH, ThroughputStats
from scratchfs.trace import Event, Trace, read_trace, write_trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import sim_replay as model  # noqa: E402
import simulate_traces as sim  # noqa: E402


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    rc = sim.main([*argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def check_structure(report: dict, totals: dict[str, int] | None = None) -> None:
    for tr in report["traces"]:
        res = {r["policy"]: r for r in tr["results"]}
        assert set(res) == {"ours", "lru", "scratch_manager", "oracle"}
        total = {r["total_bytes"] for r in res.values()}
        assert len(total) == 1  # every policy replayed the same reads
        if totals is not None:
            assert total == {totals[tr["trace"]]}
        for r in res.values():
            assert 0 <= r["hit_bytes"] <= r["total_bytes"]
            assert 0.0 <= r["hit_ratio"] <= 1.0
            assert r["bytes_copied"] >= 0 and r["copies"] >= 0
            assert r["drops"] <= r["copies"]
        for name in ("ours", "lru", "oracle"):  # exact-capacity policies never overshoot
            assert res[name]["peak"] <= tr["capacity"]
        ok, failed = model.check_targets([model.Result(**{k: v for k, v in r.items() if k != "hit_ratio"}) for r in res.values()])
        assert tr["pass"] == ok and tr["failed"] == failed


def test_synthetic_shapes_small(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, ["--scale", "0.04", "--shapes", "hot,shift,cold,scan,jobs", "--interval", "60s"])
    assert [t["trace"] for t in report["traces"]] == ["hot", "shift", "cold", "scan", "jobs"]
    assert rc == (0 if all(t["pass"] for t in report["traces"]) else 1)
    check_structure(report)


def test_recorded_trace_replays_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, ["--scale", "0.03", "--shapes", "scan", "--save-traces", str(tmp_path)])
    saved = tmp_path / "scan.jsonl.gz"
    tr = read_trace(saved)
    assert tr.total_bytes == report["traces"][0]["results"][0]["total_bytes"]
    rc2, again = run_json(capsys, ["--shapes", "", "--trace", str(saved), "--capacity", str(report["traces"][0]["capacity"])])
    check_structure(again, {"scan.jsonl.gz": tr.total_bytes})
    # same trace, same capacity, same copier: the deterministic replays agree
    assert again["traces"][0]["results"] == report["traces"][0]["results"]


def test_seed_sweep_runs_each_shape_at_each_seed_in_parallel_as_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """--seeds replays every shape at every seed (here in two processes); each trace gives the
    same figures as a run of that shape and seed alone, and the text summary counts the passes."""
    small = ["--scale", "0.03", "--interval", "60s", "--shapes", "scan,hot"]
    rc, report = run_json(capsys, [*small, "--seeds", "2-3,0", "--jobs", "2"])
    assert [t["trace"] for t in report["traces"]] == ["scan#2", "scan#3", "scan#0", "hot#2", "hot#3", "hot#0"]
    assert rc == (0 if all(t["pass"] for t in report["traces"]) else 1)
    check_structure(report)
    _, alone = run_json(capsys, [*small[:-1], "hot", "--seed", "3"])
    assert alone["traces"][0]["results"] == report["traces"][4]["results"]
    assert [t["seed"] for t in report["traces"]] == [2, 3, 0, 2, 3, 0]
    sim.main([*small, "--seeds", "2-3,0", "--jobs", "2"])
    lines = capsys.readouterr().out.splitlines()
    for shape in ("scan", "hot"):
        passed = sum(t["pass"] for t in report["traces"] if t["shape"] == shape)
        assert any(line.startswith(f"{shape:<6} {passed}/3 pass;") for line in lines)
    assert sum(" PASS" in line or " FAIL:" in line for line in lines) == 6
    assert sim.parse_seeds("0-2,1,5") == [0, 1, 2, 5]
    for bad in ("x", "3-1", "-1", ""):
        with pytest.raises(ScratchfsError):
            sim.parse_seeds(bad)


def _cfg(capacity: int, bw: float) -> model.SimConfig:
    return model.SimConfig(capacity=capacity, copy_bandwidth=bw, window=60, interval=5, min_residency=0)


def test_lru_known_answer_instant_copies() -> None:
    trace = Trace({"a": 100, "b": 100}, [Event(0, "a", 10), Event(1, "a", 10), Event(2, "b", 10), Event(3, "a", 10)])
    r = model.replay(trace, model.LruPolicy(trace, _cfg(100, 0)))
    # a@0 miss (copied), a@1 hit, b@2 miss (evicts a), a@3 miss (evicts b)
    assert (r.hit_bytes, r.total_bytes, r.copies, r.bytes_copied, r.drops) == (10, 40, 3, 300, 2)


def test_copy_takes_time_and_reads_hit_scratch_meanwhile() -> None:
    trace = Trace({"a": 100}, [Event(0, "a", 1), Event(5, "a", 1), Event(9.9, "a", 1), Event(10, "a", 1)])
    r = model.replay(trace, model.LruPolicy(trace, _cfg(1000, 10.0)))  # 100 bytes at 10 B/s: ready at t=10
    assert r.hit_bytes == 1 and r.bytes_copied == 100


def test_cancelled_copy_counts_partial_bytes() -> None:
    cache = model.CacheModel({"a": 100, "b": 100}, 10.0)
    cache.promote("a", 0.0)
    cache.promote("b", 0.0)
    cache.advance(4.0)
    cache.demote("a", 4.0)  # 40 bytes copied so far
    cache.advance(100.0)  # b starts at 4, done at 14
    assert cache.bytes_copied == 140 and "b" in cache.ready and cache.used == 100


def test_a_kept_copy_serves_again_until_a_copy_needs_its_space() -> None:
    """As mountd: a demoted image's copy stays on the disk; promoted again it is ready at once,
    nothing copied; a running copy drops kept copies, oldest demoted first, only once the bytes
    it has written need their space."""
    cache = model.CacheModel({"a": 100, "b": 100, "c": 200}, 10.0, capacity=300, keep=True)
    for name in ("a", "b"):
        cache.promote(name, 0.0)
    cache.advance(20.0)
    cache.demote("a", 20.0)
    cache.promote("a", 21.0)  # wanted back: its copy is there
    assert "a" in cache.ready and cache.bytes_copied == 200 and cache.copies == 2
    cache.demote("a", 22.0)
    cache.demote("b", 23.0)
    cache.promote("c", 30.0)  # 200 bytes at 10 B/s into a disk of 300 holding a and b (kept)
    cache.advance(39.0)  # 90 written: a and b still fit beside them
    assert list(cache.reclaimable) == ["a", "b"]
    cache.advance(41.0)  # 110 written: a (demoted first) made room
    assert list(cache.reclaimable) == ["b"]
    cache.promote("b", 42.0)  # b back from its kept copy, c still copying
    assert "b" in cache.ready and cache.copies == 3
    cache.advance(math.inf)
    assert "c" in cache.ready and cache.bytes_copied == 400 and cache.used == 300
    plain = model.CacheModel({"a": 100}, 10.0, capacity=300)  # LRU and scratch_manager delete at once
    plain.promote("a", 0.0)
    plain.advance(10.0)
    plain.demote("a", 10.0)
    plain.promote("a", 11.0)
    assert not plain.reclaimable and plain.copies == 2



def test_a_cancelled_copy_goes_on_from_its_bytes_until_their_space_is_needed() -> None:
    """As mountd: what a cancelled copy wrote stays on the disk (not a copy to serve from); the
    next copy of that image goes on from it, unless a copy needed its space meanwhile."""
    cache = model.CacheModel({"a": 100, "b": 100, "c": 150}, 10.0, capacity=250, keep=True)
    cache.promote("a", 0.0)
    cache.advance(4.0)
    cache.demote("a", 4.0)  # 40 bytes written, kept
    assert cache.kept == {"a": 40} and cache.reclaimable == [] and cache.bytes_copied == 40
    cache.promote("a", 5.0)  # not ready: 60 bytes to go
    assert "a" not in cache.ready and cache.next_done() == 11.0 and cache.busy_until(5.0) == 11.0
    cache.advance(11.0)
    assert "a" in cache.ready and cache.bytes_copied == 100 and not cache.kept
    cache.promote("b", 11.0)
    cache.advance(13.0)
    cache.demote("b", 13.0)  # 20 bytes kept
    cache.promote("c", 13.0)  # 100 (a) + 20 (b's) + c's 150 do not fit in 250: b's go
    cache.advance(26.0)
    assert cache.kept == {"b": 20}  # c has 130 written: still fits
    cache.advance(math.inf)
    assert not cache.kept and cache.bytes_copied == 270
    cache.demote("c", 40.0)
    cache.promote("b", 40.0)  # from zero again
    assert cache.next_done() == 50.0


def test_scratch_manager_floor_can_overshoot() -> None:
    """Its weights are floored to 1/1000 of the capacity, so picks can exceed the capacity."""
    cap = 1_000_000
    size = 333_999  # floor(size * 1000 / cap) = 333: three weigh 999 units ≤ 1000, but 1,001,997 bytes
    names = ["a", "b", "c"]
    picked = model._floor_knapsack(names, [1.0, 1.0, 1.0], dict.fromkeys(names, size), cap)
    assert sorted(picked) == names and 3 * size > cap
    # rounded up (--exact-scratch-manager's sm_exact), they weigh 334 units: two fit, not three
    exact = model._floor_knapsack(names, [1.0, 1.0, 1.0], dict.fromkeys(names, size), cap, round_up=True)
    assert len(exact) == 2 and 2 * size <= cap


def _reference_floor_knapsack(names: list[str], values: list[float], sizes: dict[str, int], capacity: int) -> list[str]:
    """The textbook table, cell by cell, as scratch_manager's code has it."""
    cap = 1000
    weights = [sizes[n] * cap // capacity for n in names]
    table = [[0.0] * (cap + 1)]
    for v, w in zip(values, weights):
        prev = table[-1]
        table.append([max(prev[c], prev[c - w] + v) if w <= c else prev[c] for c in range(cap + 1)])
    out, c = [], cap
    for i in range(len(names), 0, -1):
        if table[i][c] != table[i - 1][c]:
            out.append(names[i - 1])
            c -= weights[i - 1]
    return out


def test_scratch_manager_knapsack_matches_the_cell_by_cell_table() -> None:
    rng = random.Random(7)
    for _ in range(300):
        cap = rng.randint(1, 10**7)
        names = [f"n{i}" for i in range(rng.randint(0, 25))]
        sizes = {n: rng.choice([rng.randint(0, cap), rng.randint(0, cap // 50 + 1), cap // 3 + 1, 2 * cap]) for n in names}
        values = [rng.choice([float(1 << 20), 3.0, rng.uniform(0, 1e9)]) for _ in names]  # ties included
        assert model._floor_knapsack(names, values, sizes, cap) == _reference_floor_knapsack(names, values, sizes, cap)


def test_recorded_logical_sizes_scale_ours() -> None:
    """A trace that records logical sizes: ours sees image bytes (here 4:1 compressed)."""
    events = [Event(float(t), "a", 4 * 100 // 10) for t in range(0, 200, 1)]  # 40 served bytes/s
    plain = Trace({"a": 1000}, events)
    packed = Trace({"a": 1000}, events, logical_sizes={"a": 4000, "gone": 5})
    cfg = model.SimConfig(capacity=10_000, copy_bandwidth=0, window=60, interval=5, min_residency=0)
    assert model.OursPolicy(plain, cfg).scale == {}
    assert model.OursPolicy(packed, cfg).scale == {"a": 0.25}
    # 8000 served bytes = 8 image sizes unscaled, 2 scaled: both promote, the scaled one later
    first_hit = []
    for tr in (plain, packed):
        pol = model.OursPolicy(tr, cfg)
        pol.params = PolicyParams(horizon=120, window=60, copy_bandwidth=0, min_residency=0, spare=False)
        r = model.replay(tr, pol)
        first_hit.append(r.hit_bytes)
    assert first_hit[0] > first_hit[1] > 0


def test_trace_roundtrip_plain_and_gz(tmp_path: Path) -> None:
    tr = Trace({"x.v1": 5, "y": 7}, [Event(0.0, "x.v1", 3), Event(0.5, "y", 0), Event(2.25, "x.v1", 9)], meta={"host": "n1"})
    for name in ("t.jsonl", "t.jsonl.gz"):
        write_trace(tmp_path / name, tr)
        back = read_trace(tmp_path / name)
        assert back.sizes == tr.sizes and back.events == tr.events and back.meta == {"host": "n1"}
    with gzip.open(tmp_path / "t.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["scratchfs_trace"] == 1


def test_trace_torn_last_line_ignored(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"scratchfs_trace": 1, "sizes": {"a": 1}}\n{"t": 1, "dataset": "a", "bytes": 4}\n{"t": 2, "data')
    assert read_trace(p).events == [Event(1.0, "a", 4)]


def test_trace_size_lines_add_datasets(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"scratchfs_trace": 1, "sizes": {}}\n{"sizes": {"new": 10}}\n{"t": 3, "dataset": "new", "bytes": 4}\n')
    tr = read_trace(p)
    assert tr.sizes == {"new": 10} and tr.total_bytes == 4


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"t": 1, "dataset": "zz", "bytes": 1}\n', ":2: dataset 'zz' has no size"),
        ('{"t": 2, "dataset": "a", "bytes": 1}\n{"t": 1, "dataset": "a", "bytes": 1}\n', ":3: 't' goes backwards"),
        ('{"t": 1, "dataset": "a", "bytes": -1}\n', ":2: 'bytes'"),
        ("garbage\n", ":2: not a JSON object"),
    ],
)
def test_trace_bad_lines_name_the_line(tmp_path: Path, body: str, match: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"scratchfs_trace": 1, "sizes": {"a": 1}}\n' + body)
    with pytest.raises(UsageError, match=match):
        read_trace(p)


def test_trace_needs_header(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"t": 1, "dataset": "a", "bytes": 1}\n')
    with pytest.raises(UsageError, match="not a scratchfs trace"):
        read_trace(p)


def _copy_starts(pol: model.SimPolicy) -> list[tuple[str, float]]:
    """The copies *pol* starts, as (dataset, time), in order, filled in as it is replayed."""
    starts: list[tuple[str, float]] = []
    promote = pol.cache.promote

    def record(name: str, now: float) -> None:
        if name not in pol.cache:
            starts.append((name, now))
        promote(name, now)

    pol.cache.promote = record  # type: ignore[method-assign]
    return starts


def _promotions(trace: Trace, cfg: model.SimConfig, spare: bool) -> dict[str, list[float]]:
    pol = model.OursPolicy(trace, cfg)
    pol.params = PolicyParams(horizon=2 * cfg.window, window=cfg.window, copy_bandwidth=cfg.copy_bandwidth, min_residency=0, spare=spare)
    starts = _copy_starts(pol)
    model.replay(trace, pol)
    times: dict[str, list[float]] = {}
    for name, now in starts:
        times.setdefault(name, []).append(now)
    return times


def test_ours_end_to_end_scan_stays_rereads_promoted() -> None:
    """Stats → demand → policy in one replay: a scan is never copied; a dataset read over and
    over is copied in its first run once it has read about its size, and then kept."""
    size = 1000
    events = []
    for t in range(0, 100):  # "scan": its size once, in 100 s
        events.append(Event(float(t), "scan", size // 100))
    for t in range(0, 300):  # "loop": five times its size in 300 s, then again after a pause
        events.append(Event(float(t), "loop", 5 * size // 300))
    for t in range(1000, 1100):
        events.append(Event(float(t), "loop", 5 * size // 300))
    events.sort(key=lambda e: e.t)
    trace = Trace({"scan": size, "loop": size}, events)
    cfg = model.SimConfig(capacity=10 * size, copy_bandwidth=0, window=60, interval=2, min_residency=0)
    times = _promotions(trace, cfg, spare=False)
    assert "scan" not in times
    first, second = times["loop"][0], times["loop"][-1]
    assert 50 <= first <= 80  # read its size by t=60 (rent-or-buy), seen within a round or two
    assert second == first  # kept over the pause: nothing needed the space
    # with spare space lent, the scan is copied into space nobody wants (it is being read)
    assert "scan" in _promotions(trace, cfg, spare=True)


def test_ours_starts_one_copy_at_a_time_as_mountd() -> None:
    """mountd copies one image at a time and decides the rest again next round: the simulated
    copier never holds a queue for ours, and a dataset whose reads stopped before its turn
    came is never copied."""
    size = 1000
    events = [Event(float(t), n, 20 * size // 100) for t in range(0, 100) for n in ("a", "b", "c")]
    events += [Event(float(t), "d", 20 * size // 100) for t in range(0, 25)]  # admitted, but stops early
    events.sort(key=lambda e: (e.t, e.dataset))
    trace = Trace({"a": size, "b": size, "c": size, "d": size}, events)
    cfg = model.SimConfig(capacity=10 * size, copy_bandwidth=size / 15, window=60, interval=2, min_residency=0)
    pol = model.OursPolicy(trace, cfg)
    longest = 0
    starts = _copy_starts(pol)
    round_ = pol.round

    def watched(now: float) -> None:
        nonlocal longest
        round_(now)
        longest = max(longest, len(pol.cache.queue))

    pol.round = watched  # type: ignore[method-assign]
    r = model.replay(trace, pol)
    started = [name for name, _ in starts]
    assert longest == 1
    assert len(started) >= 3 and "d" not in started  # three copies of 15 s each came after d stopped
    assert r.hit_bytes > 0


def test_ours_reacts_to_first_reads_and_finished_copies_between_rounds() -> None:
    """As mountd wakes its policy when a dataset starts being read from scratch and when the
    copier becomes free: with a 10 s round, the second copy starts the moment the first ends,
    and a dataset that starts being read is looked at on that read."""
    size = 1000
    events = [Event(float(t), n, 20 * size // 100) for t in range(0, 200) for n in ("a", "b")]
    events.sort(key=lambda e: (e.t, e.dataset))
    trace = Trace({"a": size, "b": size}, events)
    cfg = model.SimConfig(capacity=10 * size, copy_bandwidth=size / 15, window=60, interval=10, min_residency=0)
    pol = model.OursPolicy(trace, cfg)
    starts = _copy_starts(pol)
    rounds: list[float] = []
    round_ = pol.round

    def watched(now: float) -> None:
        rounds.append(now)
        round_(now)

    pol.round = watched  # type: ignore[method-assign]
    model.replay(trace, pol)
    firsts: dict[str, float] = {}
    for name, now in starts:
        firsts.setdefault(name, now)
    assert rounds[:2] == [0.0, 0.0]  # the round at 0, then the first read of a wakes it again
    first, second = sorted(firsts.values())
    assert second == pytest.approx(first + 15)  # when the first copy ended, not at the next round (20 s)


def test_ours_lets_a_dataset_read_much_faster_go_before_a_long_copy() -> None:
    """As mountd: the copy running is cancelled when the first dataset waiting serves more from
    the SSD (scratchfs.policy.gives_way), and goes on after it from the bytes it had copied
    (kept on the disk): nothing is copied twice."""
    big, small = 3000, 300
    events = [Event(float(t), "big", 100) for t in range(0, 1000)]
    events += [Event(t / 10, "small", 100) for t in range(700, 10000)]  # 1000/s from t=70; copies take 300 s and 30 s
    events.sort(key=lambda e: (e.t, e.dataset))
    trace = Trace({"big": big, "small": small}, events)
    cfg = model.SimConfig(capacity=10 * big, copy_bandwidth=10, window=600, interval=2, min_residency=0)
    pol = model.OursPolicy(trace, cfg)
    started = _copy_starts(pol)
    r = model.replay(trace, pol)
    assert [n for n, _ in started] == ["big", "small", "big"]
    (_, t_big), (_, t_small), (_, t_again) = started
    assert t_small < t_big + big / 10  # before the big copy would have ended
    assert t_again >= t_small + small / 10  # the big one again once the small one is copied
    assert r.drops == 1 and r.bytes_copied == big + small  # the cancelled copy's bytes were used


def test_a_sampled_trace_is_spread_over_its_sampling_interval() -> None:
    tr = Trace({"a": 10, "b": 10}, [Event(1.0, "a", 7), Event(1.0, "b", 4), Event(2.0, "a", 9)], interval=1.0)
    out = model.spread(tr, 0.4)  # three parts of 1/3 s each
    assert [(round(e.t, 3), e.dataset, e.nbytes) for e in out.events] == [
        (0.333, "a", 2), (0.333, "b", 1), (0.667, "a", 2), (0.667, "b", 1), (1.0, "a", 3), (1.0, "b", 2),
        (1.333, "a", 3), (1.667, "a", 3), (2.0, "a", 3),
    ]  # fmt: skip
    assert out.total_bytes == tr.total_bytes and out.interval == pytest.approx(1 / 3)
    assert model.spread(tr, 1.0) is tr  # buckets no shorter than the interval: as it is
    per_read = Trace({"a": 10}, [Event(1.0, "a", 7)])
    assert model.spread(per_read, 0.1) is per_read  # a trace of single reads: as it is


def test_a_dataset_read_all_the_time_is_never_idle_once_its_samples_are_spread() -> None:
    """Sampled once a second, replayed into buckets of half a second: in one lump per sample the
    dataset looks idle at every other round; spread, it is read at every round, as mountd saw it."""
    # a sample late in its bucket (at t + 0.45), a round early in another (at t + 0.2)
    tr = Trace({"a": 10**9}, [Event(t + 0.45, "a", 10**6) for t in range(1, 61)], interval=1.0)

    def idle_rounds(trace: Trace) -> int:
        stats, events, idle = ThroughputStats(30.0, buckets=model.BUCKETS), list(trace.events), 0
        for k in range(10, 60):  # a round a second, from t = 10.2 s to 59.2 s
            now = k + 0.2
            while events and events[0].t <= now:
                e = events.pop(0)
                stats.record(e.dataset, SCRATCH, e.nbytes, e.t)
            idle += demand_from_snapshot(stats.snapshot(now))["a"].idle > 0
        return idle

    assert idle_rounds(tr) > 0
    assert idle_rounds(model.spread(tr, 30.0 / model.BUCKETS)) == 0


def test_a_promotion_soon_after_a_demotion_counts_as_a_flap() -> None:
    cache = model.CacheModel({"a": 100, "b": 100}, bandwidth=0, capacity=200, keep=True)
    cache.promote("a", 0.0)
    cache.demote("a", 5.0)
    cache.promote("a", 5.0 + model.FLAP_SECONDS)  # taken back (from its kept copy) in time
    cache.demote("a", 20.0)
    cache.promote("a", 20.0 + model.FLAP_SECONDS + 1)  # later: not a flap
    cache.promote("b", 1.0)  # never demoted
    assert cache.flaps == 1 and cache.drops == 2
