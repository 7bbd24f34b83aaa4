"""Tracked jobs on the real single-node Slurm, as an unprivileged user."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import UserSession, wait_for

pytestmark = pytest.mark.slurm

LONG = "train-model-with-a-name-longer-than-squeue-shows"


def _jobs(u: UserSession, *args: str) -> subprocess.CompletedProcess[str]:
    return u.sfs("jobs", *args)


def _listing(u: UserSession, *args: str) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads(u.ok(_jobs(u, "list", "--json", *args)))["jobs"]}


def _gone(u: UserSession, name: str) -> bool:
    return not u.queue(name)


def test_scancelled_job_is_relaunched_on_the_next_pass_and_finished_one_is_not(user: UserSession) -> None:
    u = user
    wd = u.mkdir("work")
    cmd = f"sbatch -J {LONG} -o /dev/null --wrap 'sleep 600'"
    out = u.ok(_jobs(u, "launch", "--name", LONG, "--command", cmd, "--workdir", str(wd), "--indicator", "done.flag"))
    assert "launched job" in out
    first = u.queue(LONG)
    assert len(first) == 1, first

    # alive: a pass changes nothing
    u.ok(_jobs(u, "run", "--once"))
    assert [j for j, _ in u.queue(LONG)] == [first[0][0]]

    # a second watcher is refused while one runs
    bg = subprocess.Popen(["runuser", "-u", u.cluster.user, "--", "env", "-i",
                           *[f"{k}={v}" for k, v in u.env.items()],
                           u.python, "-m", "scratchfs.cli", "jobs", "run", "--interval", "60"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (u.state_home / "scratchfs" / "jobs" / "watch.lock").exists()
                 and (u.state_home / "scratchfs" / "jobs" / "watch.lock").stat().st_size > 0, 30,
                 "the background watcher to take its lock", interval=0.3)
        second = _jobs(u, "run", "--once")
        assert second.returncode == 5 and "already running (pid" in second.stderr, second.stderr
    finally:
        bg.terminate()
        bg.communicate(timeout=30)

    # scancel → the next pass relaunches it under the same long name
    u.ok(u.run("scancel", first[0][0]))
    wait_for(lambda: _gone(u, LONG), 30, "the cancelled job to leave the queue")
    out = u.ok(_jobs(u, "run", "--once"))
    again = u.queue(LONG)
    assert len(again) == 1 and again[0][0] != first[0][0], (again, out)
    row = _listing(u)[LONG]
    assert row["relaunches"] == 1 and row["status"] == "queued"

    # done indicator present + job gone → finished, never relaunched
    (wd / "done.flag").write_text("ok\n")
    u.ok(u.run("scancel", again[0][0]))
    wait_for(lambda: _gone(u, LONG), 30, "the job to leave the queue")
    out = u.ok(_jobs(u, "run", "--once"))
    assert f"{LONG}: finished" in out, out
    assert _gone(u, LONG)
    assert LONG in _listing(u, "--finished") and LONG not in _listing(u, "--unfinished")
    u.ok(_jobs(u, "run", "--once"))
    assert _gone(u, LONG)


def test_array_job_not_relaunched_while_a_task_runs(user: UserSession) -> None:
    u = user
    wd = u.mkdir("arr")
    name = "array-sweep"
    cmd = (f"sbatch -J {name} -o /dev/null --array=1-3 "
           "--wrap 'if [ $SLURM_ARRAY_TASK_ID = 3 ]; then sleep 600; else sleep 1; fi'")
    u.ok(_jobs(u, "launch", "--name", name, "--command", cmd, "--workdir", str(wd)))
    # tasks 1 and 2 end, task 3 keeps running
    remaining = wait_for(lambda: (q := u.queue(name)) and len(q) == 1 and q[0][1] == "RUNNING" and q, 60,
                         "only the long array task to remain")
    assert remaining[0][0].endswith("_3"), remaining
    u.ok(_jobs(u, "run", "--once"))
    assert [j for j, _ in u.queue(name)] == [remaining[0][0]], "no relaunch while a task of the array runs"
    assert _listing(u)[name]["relaunches"] == 0

    u.ok(u.run("scancel", remaining[0][0].split("_")[0]))
    wait_for(lambda: _gone(u, name), 30, "the array to leave the queue")
    u.ok(_jobs(u, "run", "--once"))
    assert len({j.split("_")[0] for j, _ in u.queue(name)}) == 1, "relaunched once the whole array is gone"


def test_relaunch_limit_is_respected(user: UserSession) -> None:
    u = user
    wd = u.mkdir("lim")
    name = "crashes-at-once"
    u.ok(_jobs(u, "add", "--name", name, "--command", f"sbatch -J {name} -o /dev/null --wrap 'exit 1'",
               "--workdir", str(wd), "--max-relaunches", "2", "--backoff", "0s"))
    launched = 0
    for _ in range(4):
        out = u.ok(_jobs(u, "run", "--once"))
        launched += out.count(f"{name}: launched job")
        wait_for(lambda: _gone(u, name), 60, "the crashing job to leave the queue")
    row = _listing(u)[name]
    assert row["relaunches"] == 2 and row["status"] == "limit", row
    assert launched == 2
    # relaunch by hand resets the count
    u.ok(_jobs(u, "relaunch", "--name", name))
    assert _listing(u)[name]["relaunches"] == 0


def test_watcher_installed_as_self_resubmitting_job(user: UserSession) -> None:
    u = user
    wd = u.mkdir("w")
    name = "needs-a-watcher"
    u.ok(_jobs(u, "add", "--name", name, "--command", f"sbatch -J {name} -o /dev/null --wrap 'sleep 600'",
               "--workdir", str(wd)))
    out = u.ok(_jobs(u, "install-watcher", "--mode", "sbatch", "--interval", "5m"))
    assert "submitted job" in out
    # the watcher job runs once, launches the tracked job, and queues its own successor
    wait_for(lambda: u.queue(name), 90, "the watcher job to launch the tracked job")
    # (the job that queued it may still show as RUNNING for a moment: wait until it is gone)
    w = wait_for(lambda: (q := u.queue("scratchfs-jobs-watcher")) and all(st == "PENDING" for _, st in q) and q, 60,
                 "the watcher's successor, alone")
    assert len(w) == 1, w  # one successor, not a second chain
    st = json.loads(u.ok(_jobs(u, "watcher-status", "--json")))
    assert st["installed"] and st["schedule"]["mode"] == "sbatch"
    u.ok(_jobs(u, "uninstall-watcher"))
    wait_for(lambda: _gone(u, "scratchfs-jobs-watcher"), 30, "the watcher chain to be cancelled")
