#!/usr/bin/env python3
"""The promotion policy live: a read workload through a real mountd, recorded and replayed.

The workload runs through a real ``scratchfs-mountd`` started with ``--record-trace``; the
trace is then replayed through ``tools/simulate_traces.py`` with the same settings.

Prints, for the same reads:

* what mountd did: its byte hit ratio (bytes served from the cache / all bytes served, from
  its status) and the bytes its copies read from scratch;
* the simulator's table for the recorded trace: ours, LRU, scratch_manager's policy and the
  oracle, and whether ours meets the targets there.

The first row checks the simulator against the daemon it models (their ``ours`` should agree
closely; they differ by the timing of real copies, verification and policy rounds); the table
is the simulator's verdict on a trace recorded by mountd.

The workload, from ``--seed``: a few datasets read by jobs over and over (long runs, short
pauses), a few read by short jobs now and then, a few read once start to end (scans). Readers
are paced (each job at its own rate) and drop the pages they read, so every read reaches FUSE.
Scratch is the local disk, not throttled: what is measured is which bytes come from where, not
how fast; copies are limited to ``--copy-bw`` so that they take time, as on a real node.

Needs root, as mountd does (its FUSE mount, its work directory under /var/tmp). Takes
``--minutes`` plus about a minute.

    python tools/bench_policy_live.py [--minutes 8] [--seed 1] [--copy-bw 24M] [--window 30s]
                                      [--save-trace FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_mountd import BIN, MiB, data_file, sh, stop_mountd  # noqa: E402
from sim_shapes import JOB_SIZES, Job, job_workload  # noqa: E402

from scratchfs.status_cmd import request  # noqa: E402
from scratchfs.units import format_size, parse_duration, parse_size  # noqa: E402

CHUNK = 256 * 1024


def read_job(job: Job, path: Path, t0: float, deadline: float, errors: list[str]) -> None:
    """Read *path* at the job's rate from its start for its length (a scan: once through)."""
    time.sleep(max(0.0, t0 + job.start - time.monotonic()))
    begin = time.monotonic()
    stop = min(begin + job.length, deadline)
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        errors.append(f"{job.dataset}: open: {e}")
        return
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while time.monotonic() < stop:
            data = os.pread(fd, CHUNK, pos)
            if not data:
                if job.scan:
                    return
                pos = 0
                continue
            os.posix_fadvise(fd, pos, len(data), os.POSIX_FADV_DONTNEED)  # the next pass reaches FUSE
            pos += len(data)
            if pos >= size and job.scan:
                return
            done += len(data)
            time.sleep(max(0.0, begin + done / job.rate - time.monotonic()))
    except OSError as e:
        errors.append(f"{job.dataset}: read at {pos}: {e}")
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=8.0, help="length of the workload (default 8)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--copy-bw", default="24M", help="mountd's copy_bandwidth, bytes/s (default 24M)")
    ap.add_argument("--window", default="30s", help="mountd's throughput window (default 30s)")
    ap.add_argument("--save-trace", type=Path, help="keep the recorded trace in this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_policy_live: needs root, as mountd does", file=sys.stderr)
        return 7
    copy_bw, window = parse_size(args.copy_bw), parse_duration(args.window)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally below
    top = Path(tempfile.mkdtemp(prefix="bench-policy-", dir="/var/tmp"))
    data, cache, mnt = top / "data", top / "cache", top / "mnt"
    for d in (data, cache, mnt):
        d.mkdir()
    sock, log, trace, config = top / "ctl.sock", top / "mountd.log", top / "trace.jsonl", top / "mountd.toml"
    pid = 0
    try:
        rng = random.Random(args.seed)
        names = [f"ds{i}" for i in range(len(JOB_SIZES))]
        sizes = list(JOB_SIZES)
        rng.shuffle(sizes)
        for i, (name, mib) in enumerate(zip(names, sizes, strict=True)):
            src = top / f"src-{name}"
            src.mkdir()
            data_file(src / "data", mib * MiB, args.seed * 100 + i)
            res = sh([str(BIN / "scratchfs"), "image", "build", str(src), str(data / f"{name}.sqfs")], check=False)
            if res.returncode != 0:
                raise SystemExit(f"image build failed: {res.stderr.strip()}")
            shutil.rmtree(src)
        total = sum((data / f"{n}.sqfs").stat().st_size for n in names)
        capacity = int(total * 0.35)
        config.write_text(
            f'datadir = "{data}"\ncachedir = "{cache}"\nmountdir = "{mnt}"\ncapacity = "{capacity}"\n'
            f'reserve = 0\nwindow = "{args.window}"\nmin_residency = 0\ncopy_bandwidth = {copy_bw}\n'
        )
        res = sh([str(BIN / "scratchfs-mountd"), "--config", str(config), "--socket", str(sock), "--log", str(log),
                  "--record-trace", str(trace)], check=False)  # fmt: skip
        if res.returncode != 0:
            raise SystemExit(f"scratchfs-mountd failed: {res.stderr.strip()}")
        pid = int(request(str(sock), {"op": "status"})["status"]["pid"])
        jobs = job_workload(rng, names, args.minutes * 60)
        print(f"# {len(names)} images, {format_size(total)} in all, capacity {format_size(capacity)} (35 %); "
              f"window {window:g} s, copies at {format_size(copy_bw)}/s; {len(jobs)} jobs over "
              f"{args.minutes:g} min (seed {args.seed})", flush=True)  # fmt: skip
        errors: list[str] = []
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        threads = [threading.Thread(target=read_job, args=(j, mnt / j.dataset / "data", t0, deadline, errors),
                                    daemon=True) for j in jobs]  # fmt: skip
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            time.sleep(30)
            left = sum(th.is_alive() for th in threads)
            print(f"  {time.monotonic() - t0:5.0f} s: {left} of {len(jobs)} jobs still to run or running", flush=True)
        time.sleep(3)  # the last reads reach the counters and the trace
        st = request(str(sock), {"op": "status"})["status"]
        served_cache = sum(d["bytes_cache"] for d in st["datasets"])
        served = served_cache + sum(d["bytes_scratch"] for d in st["datasets"])
        copied = sum(d["bytes_copied"] for d in st["datasets"])
        stop_mountd(pid, mnt)  # the trace is complete once it has unmounted
        pid = 0
        if args.save_trace:
            shutil.copyfile(trace, args.save_trace)
        if errors:
            print("read errors:\n  " + "\n  ".join(errors[:10]))
            return 1
        res = sh([sys.executable, str(Path(__file__).with_name("simulate_traces.py")), "--shapes", "", "--trace", str(trace),
                  "--capacity", str(capacity), "--copy-bandwidth", str(copy_bw), "--window", args.window,
                  "--min-residency", "0", "--json"], check=False)  # fmt: skip
        if res.returncode not in (0, 1):
            raise SystemExit(f"simulate_traces failed: {res.stderr.strip()}")
        rec: dict[str, Any] = json.loads(res.stdout)["traces"][0]
        print(f"recorded trace: {rec['reads']} events, {format_size(served)} served")
        print(f"{'':24} {'hit ratio':>9} {'copied':>11}")
        print(f"{'mountd (live)':24} {served_cache / max(served, 1):9.3f} {format_size(copied):>11}")
        by = {r["policy"]: r for r in rec["results"]}
        for label, key in (("simulated: ours", "ours"), ("simulated: lru", "lru"),
                           ("simulated: scratch_mgr", "scratch_manager"), ("simulated: oracle", "oracle")):  # fmt: skip
            print(f"{label:24} {by[key]['hit_ratio']:9.3f} {format_size(by[key]['bytes_copied']):>11}")
        print("targets on the recorded trace: " + ("PASS" if rec["pass"] else "FAIL: " + "; ".join(rec["failed"])))
        return 0
    finally:
        stop_mountd(pid, mnt)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
