#!/usr/bin/env python3
"""Benchmark `scratch-keepalive refresh` against `find DIR -exec touch -a -c {} +`.

Prints, from one run on this machine:
  * refresh rate (files/s) on a 200,000-file tree vs find+touch on an identical tree, as a ratio
    (interleaved rounds, medians; both measured as whole processes, start-up included);
  * resume overhead: a refresh SIGKILLed half-way, then resumed — the resumed run's time
    against the remaining share of a full run, and the units redone;
  * peak RSS of the refresh process at 200,000 files and (with --million) at 1,000,000 files.

Usage: tools/bench_refresh.py [--dir TMPDIR] [--files 200000] [--rounds 3] [--workers 1] [--million]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchfs.keepalive import checkpoint as ck  # noqa: E402


def build(base: Path, files: int, per_dir: int = 1000) -> None:
    for d in range((files + per_dir - 1) // per_dir):
        sub = base / f"g{d // 100:03d}" / f"d{d % 100:02d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            os.close(os.open(sub / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))


def count(base: Path) -> int:
    n = 1
    for _dp, dn, fn in os.walk(base):
        n += len(dn) + len(fn)
    return n


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return dt, usage.ru_maxrss


def keepalive(env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-m", "scratchfs.keepalive.cli", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", default=None, help="where to build the trees (default: a temp dir)")
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--million", action="store_true", help="also measure peak memory at 1,000,000 files")
    args = ap.parse_args()

    top = Path(tempfile.mkdtemp(prefix="bench-refresh-", dir=args.dir))
    env = dict(os.environ, XDG_CONFIG_HOME=str(top / "cfg"), XDG_STATE_HOME=str(top / "state"))
    try:
        scratch = top / "scratch"
        a, b = scratch / "a", scratch / "b"
        t0 = time.perf_counter()
        build(a, args.files)
        build(b, args.files)
        n = count(a)
        print(f"trees: 2 × {n:,} entries ({args.files:,} files in dirs of 1,000), built in {time.perf_counter() - t0:.1f}s")
        subprocess.run(keepalive(env, "init", "--profile", "local", "--root", str(scratch)), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(keepalive(env, "add", "--name", "a", "--path", str(a), "--keep-until", "2099-12-31"),
                       env=env, check=True, stdout=subprocess.DEVNULL)
        ours_cmd = keepalive(env, "refresh", "--name", "a", "--workers", str(args.workers), "--no-progress")
        find_cmd = ["find", str(b), "-exec", "touch", "-a", "-c", "{}", "+"]
        portable_cmd = [*ours_cmd, "--method", "utime"]
        par_cmd = keepalive(env, "refresh", "--name", "a", "--workers", "2", "--no-progress")

        ours: list[float] = []
        theirs: list[float] = []
        portable: list[float] = []
        par: list[float] = []
        rss_200k = 0
        for cmd in (ours_cmd, find_cmd, portable_cmd, par_cmd):  # warm-up, not counted: writeback of the fresh trees
            run_timed(cmd, env)
        for r in range(args.rounds):
            order = [("ours", ours_cmd), ("find", find_cmd), ("portable", portable_cmd), ("par", par_cmd)]
            if r % 2:
                order.reverse()
            for label, cmd in order:
                dt, rss = run_timed(cmd, env)
                {"ours": ours, "find": theirs, "portable": portable, "par": par}[label].append(dt)
                if label == "ours":
                    rss_200k = max(rss_200k, rss)
        mo, mf, mp = statistics.median(ours), statistics.median(theirs), statistics.median(portable)
        mw = statistics.median(par)
        print(f"\nrefresh rate, {n:,} entries, medians of {args.rounds} interleaved rounds:")
        print(f"  scratch-keepalive refresh (utimensat, {args.workers} worker): {mo:6.2f}s  {n / mo:10,.0f} files/s")
        print(f"  scratch-keepalive refresh (lstat + os.utime):       {mp:6.2f}s  {n / mp:10,.0f} files/s")
        print(f"  scratch-keepalive refresh (utimensat, 2 processes):{mw:6.2f}s  {n / mw:10,.0f} files/s")
        print(f"  find DIR -exec touch -a -c {{}} +:                    {mf:6.2f}s  {n / mf:10,.0f} files/s")
        print(f"  ratio refresh / find+touch: {mf / mo:.2f}x  (2 workers: {mf / mw:.2f}x, portable method: {mf / mp:.2f}x)")
        print(f"  machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

        # resume overhead: kill half-way, resume, compare with the remaining share of a full run
        ddir = top / "state" / "scratchfs" / "keepalive" / "local" / "datasets" / "a"
        proc = subprocess.Popen(ours_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        info = None
        done = 0
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                info = info or ck.read_plan_info(ddir / ck.PLAN_NAME)
                done = len(ck.read_journal(ddir / ck.JOURNAL_NAME).done)
            except (FileNotFoundError, ck.CheckpointError):
                pass
            if info and done >= info.units // 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        if info is None or proc.returncode != -signal.SIGKILL:
            print("\nresume: the run finished before it could be killed half-way (skipped)")
        else:
            done_at_kill = len(ck.read_journal(ddir / ck.JOURNAL_NAME).done)
            dt_resume, _ = run_timed(ours_cmd, env)
            remaining = (info.units - done_at_kill) / info.units
            expected = remaining * mo
            print(f"\nresume after SIGKILL at {done_at_kill}/{info.units} units:")
            print(f"  resumed run {dt_resume:.2f}s vs {expected:.2f}s for the remaining {remaining:.0%} of a full run "
                  f"-> overhead {dt_resume / expected - 1:+.0%} "
                  f"(includes start-up, plan validation and at most {2 * args.workers} units in flight redone)")

        print(f"\npeak RSS of refresh at {n:,} entries: {rss_200k / 1024:.1f} MiB")
        if args.million:
            shutil.rmtree(b)
            m = scratch / "m"
            t0 = time.perf_counter()
            build(m, 1_000_000)
            nm = count(m)
            print(f"built {nm:,} entries in {time.perf_counter() - t0:.0f}s")
            subprocess.run(keepalive(env, "add", "--name", "m", "--path", str(m), "--keep-until", "2099-12-31"),
                           env=env, check=True, stdout=subprocess.DEVNULL)
            dt, rss = run_timed(keepalive(env, "refresh", "--name", "m", "--workers", str(args.workers),
                                          "--no-progress"), env)
            print(f"peak RSS of refresh at {nm:,} entries: {rss / 1024:.1f} MiB  ({dt:.1f}s, {nm / dt:,.0f} files/s)")
            print(f"memory growth 200k -> 1M entries: {(rss - rss_200k) / 1024:+.1f} MiB")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
