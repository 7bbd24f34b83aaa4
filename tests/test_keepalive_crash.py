"""SIGKILL a real `refresh` at 20 random moments on a 50,000-file tree.

After every kill the checkpoint must be valid; no unit journaled before a kill may be started
again; what was lost at each kill is only the units in flight (at most 2 × workers); and in
the end every entry is refreshed with its mtime unchanged.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchfs.keepalive import checkpoint as ck
from scratchfs.keepalive import paths
from scratchfs.keepalive.cli import main
from scratchfs.keepalive.refresh import read_last_run
from tests.mounts import wait_for

FILES = 50_000
KILLS = 20
WORKERS = 2
UNIT = 250
OLD_NS = int((time.time() - 100 * 86400) * 1e9)
MTIME_NS = int((time.time() - 400 * 86400) * 1e9)


def build_tree(base: Path) -> int:
    n = 0
    for d in range(FILES // 1000):
        sub = base / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            fd = os.open(sub / f"f{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
            n += 1
        os.symlink("f0000", sub / "link")
        n += 1
    return n


def all_entries(base: Path):
    yield base
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def age_everything(base: Path) -> None:
    for p in all_entries(base):
        os.utime(p, ns=(OLD_NS, MTIME_NS), follow_symlinks=False)


START_RE = re.compile(r"unit (\d+) start \((\d+) entries\)")
PLAN_RE = re.compile(r"(?:planned|resuming plan) ([0-9a-f]{32})")


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root = tmp_path / "scratch"
    ds = root / "ds"
    build_tree(ds)
    age_everything(ds)
    total = sum(1 for _ in all_entries(ds))
    assert total >= FILES
    assert main(["init", "--profile", "local", "--root", str(root)]) == 0
    assert main(["add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31"]) == 0
    ddir = paths.dataset_dir("local", "ds")
    logs = paths.log_dir("local")
    rng = random.Random(20240531)
    cmd = [sys.executable, "-m", "scratchfs.keepalive.cli", "refresh", "--name", "ds", "--workers", str(WORKERS),
           "--unit-size", str(UNIT), "--no-progress"]
    started_at = time.time_ns()

    journaled: dict[str, set[int]] = {}  # plan id → units journaled so far
    started: dict[str, int] = {}  # plan id → entries handed to workers over all runs
    lost: dict[str, int] = {}  # plan id → entries of units in flight at the kills
    plan_entries: dict[str, int] = {}
    kills = completions = 0
    while kills < KILLS:
        before_logs = set(logs.glob("*.log")) if logs.exists() else set()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        wait_for(lambda p=proc, old=before_logs: p.poll() is not None or (logs.exists() and set(logs.glob("*.log")) - old),
                 "refresh to start", 60, interval=0.005)  # fmt: skip
        time.sleep(rng.uniform(0.0, 0.35))  # the random moment, counted from the run's start
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        assert killed or proc.returncode == 0, proc.returncode
        (log_file,) = set(logs.glob("*.log")) - before_logs
        text = log_file.read_text()
        plan_ids = PLAN_RE.findall(text)
        if not plan_ids:
            assert killed  # killed before a plan existed: nothing started
            assert not START_RE.search(text)
            continue
        (pid,) = plan_ids
        starts = [(int(u), int(n)) for u, n in START_RE.findall(text)]
        prev = journaled.get(pid, set())
        redone = {u for u, _ in starts} & prev
        assert not redone, f"units journaled before a kill were redone: {sorted(redone)[:5]}"
        started[pid] = started.get(pid, 0) + sum(n for _, n in starts)
        if killed and not (ddir / ck.PLAN_NAME).exists():
            # killed after the last unit, once the checkpoint was already deleted
            assert (read_last_run("local", "ds") or {}).get("status") == "complete"
            killed = False
        if killed:
            health = ck.inspect_checkpoint(ddir)
            assert health.ok, health.message
            info = ck.read_plan_info(ddir / ck.PLAN_NAME)
            assert info.plan_id == pid
            plan_entries[pid] = info.entries
            try:
                done = set(ck.read_journal(ddir / ck.JOURNAL_NAME).done)
            except FileNotFoundError:
                done = set()
            assert prev <= done
            in_flight = {u for u, _ in starts} - done
            assert len(in_flight) <= 2 * WORKERS
            lost[pid] = lost.get(pid, 0) + sum(n for u, n in starts if u in in_flight)
            journaled[pid] = done
        else:
            completions += 1
            assert not (ddir / ck.PLAN_NAME).exists()
            plan_entries.setdefault(pid, total)
    assert main(["refresh", "--name", "ds", "--no-progress"]) == 0
    for p in all_entries(ds):
        st = os.lstat(p)
        assert st.st_atime_ns >= started_at - 10**9, p
        assert st.st_mtime_ns == MTIME_NS, p
    for pid, n in started.items():
        assert n <= plan_entries[pid] + lost.get(pid, 0), (pid, n, plan_entries[pid], lost.get(pid, 0))
    assert kills == KILLS
    print(f"{kills} kills, {completions} completed runs, plans {len(started)}, "
          f"entries started {sum(started.values())}, lost in flight {sum(lost.values())}")


def test_a_burst_of_sigterms_stops_a_paced_refresh_which_records_where_it_stopped(tmp_path, monkeypatch):
    """A job killed at its time limit gets SIGTERM from Slurm and, within microseconds, from its
    parent processes. The refresh's handler once set a threading.Event, whose lock a second
    handler run (or the interrupted Event.wait) already held: it hung until SIGKILL and never
    recorded the run. Here a paced refresh gets 200 SIGTERMs in a tight loop, five times."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root = tmp_path / "scratch"
    ds = root / "ds"
    ds.mkdir(parents=True)
    for i in range(400):
        (ds / f"f{i:03d}").touch()
    assert main(["init", "--profile", "local", "--root", str(root)]) == 0
    assert main(["add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31"]) == 0
    logs = paths.log_dir("local")
    cmd = [sys.executable, "-m", "scratchfs.keepalive.cli", "refresh", "--name", "ds", "--workers", "1",
           "--unit-size", "5", "--max-rate", "20", "--no-progress"]
    for attempt in range(5):
        before = set(logs.glob("*.log")) if logs.exists() else set()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())

        def units_under_way(p: subprocess.Popen[bytes] = proc, old: set[Path] = before) -> bool:
            """Paced units are under way (and the refresh still runs)."""
            assert p.poll() is None, "refresh did not start units"
            new = set(logs.glob("*.log")) - old if logs.exists() else set()
            return any(START_RE.search(f.read_text()) for f in new)

        wait_for(units_under_way, "refresh to start units", 60, interval=0.02)
        # a real process must act: each attempt signals it at another point of its pacing wait
        time.sleep(0.1 * attempt)
        for _ in range(200):
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)  # a hang, not a speed: a stopping refresh needs well under a second
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("refresh hung after a burst of SIGTERMs")
        assert rc == 9, rc  # ExternalFailure: "refresh stopped by SIGTERM; the next run resumes"
        last = read_last_run("local", "ds")
        assert last is not None and last["status"] == "interrupted", last
