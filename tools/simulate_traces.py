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
"Bytes copied" is what the copier read from scratch.  ``flaps`` counts promotions of a dataset
within ``FLAP_SECONDS`` (10 s) of its demotion: a policy taking back what it just gave up
(informational, not a target).

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
* ``jobs``    — 8 images of 20–130 GiB, each read by one job at a time, as
  ``tools/bench_policy_live.py`` reads them live, stretched to this scale: three read over and
  over (jobs of 13–40 minutes at 170–500 MiB/s, 2–13 minutes apart), two by a short job now and
  then, three scanned once.  The pauses between a dataset's jobs are shorter than the window.

Recorded traces (``--trace FILE``, the format of :mod:`scratchfs.trace`, as mountd's
``--record-trace`` writes it) are replayed the same way.  mountd's recorder writes one event
per dataset and sampling interval (the header's ``interval``); where the stats buckets
(window / 60) are shorter than that, each event is spread evenly over its interval before the
replay (:func:`sim_replay.spread`), so the policies' counters see the reads over time as
mountd's did, not in lumps that leave every other bucket empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim_replay import Result, SimConfig, check_targets, run_all  # noqa: E402
from sim_shapes import SHAPES  # noqa: E402

from scratchfs.errors import ScratchfsError  # noqa: E402
from scratchfs.trace import read_trace, write_trace  # noqa: E402
from scratchfs.units import format_size, parse_duration, parse_size  # noqa: E402

log = logging.getLogger("simulate_traces")


# -- command line -----------------------------------------------------------------------------


def _fmt_row(trace: str, r: Result) -> str:
    return (
        f"{trace:<10} {r.policy:<16} {r.hit_ratio:>7.3f} {format_size(r.bytes_copied):>11} {r.copies:>6} {r.flaps:>5} "
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
    p.add_argument("--min-residency", default="0", help="mountd's min_residency [0]")
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
    print(f"{'trace':<10} {'policy':<16} {'hit':>7} {'copied':>11} {'copies':>6} {'flaps':>5} {'peak':>6}")
    for rec in records:
        for r in rec["results"]:
            print(_fmt_row(str(rec["trace"]), Result(**{k: v for k, v in r.items() if k != "hit_ratio"})))
        print(f"{rec['trace']:<10} {'PASS' if rec['pass'] else 'FAIL: ' + '; '.join(rec['failed'])}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
