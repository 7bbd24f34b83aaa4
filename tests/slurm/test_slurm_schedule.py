"""Scheduled refreshes on the real single-node Slurm, as an unprivileged user."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import UserSession, wait_for

pytestmark = pytest.mark.slurm

PROFILE = "t"
JOB = f"scratchfs-keepalive-{PROFILE}"
BEGIN = f"# >>> scratchfs keepalive: profile {PROFILE} >>>"
END = f"# <<< scratchfs keepalive: profile {PROFILE} <<<"
DAY = 86400.0


def _setup_profile(u: UserSession, n_files: int = 300, *extra: str) -> Path:
    old = time.time() - 40 * DAY
    tree = u.make_tree("scratch/ds", n_files, old_atime=old)
    u.ok(u.ka("init", "--profile", PROFILE, "--root", str(u.scratch), "--purge-on", "atime",
              "--purge-age", "30d", "--mem", "200M", "--time-limit", "00:05:00", *extra))
    u.ok(u.ka("add", "--profile", PROFILE, "--name", "ds", "--path", str(tree), "--keep-until", "2099-12-31"))
    return tree


def _state_dir(u: UserSession) -> Path:
    return u.state_home / "scratchfs" / "keepalive" / PROFILE


def _last_run(u: UserSession) -> dict | None:
    p = _state_dir(u) / "datasets" / "ds" / "last_run.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _schedule(u: UserSession) -> dict:
    return json.loads((_state_dir(u) / "schedule.json").read_text())


def _oldest_atime(tree: Path) -> float:
    return min(os.lstat(os.path.join(d, f)).st_atime for d, _, fs in os.walk(tree) for f in fs)


def test_scrontab_block_runs_refresh_and_uninstall_keeps_other_lines(user: UserSession) -> None:
    u = user
    tree = _setup_profile(u)
    before = _oldest_atime(tree)
    # the user's own entry, which we must never touch
    foreign = "#SCRON --job-name=users-own-entry\n30 4 * * * /bin/true\n"
    (u.root / "mine.cron").write_text(foreign)
    os.chmod(u.root / "mine.cron", 0o644)
    u.ok(u.run("scrontab", str(u.root / "mine.cron")))

    for _ in range(2):  # twice → still one block
        u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "scrontab", "--every", "1m"))
    text = u.scrontab_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, text
    assert "30 4 * * * /bin/true" in text
    assert text.index("/bin/true") < text.index(BEGIN), "the user's lines keep their place"
    cron_lines = [ln for ln in text.splitlines() if ln.startswith("* * * * * ")]
    assert len(cron_lines) == 1, text

    # the entry fires on the next minute and really runs refresh --all; the registry records it
    run = wait_for(lambda: (r := _last_run(u)) and r.get("status") == "complete" and r,
                   150, "a scheduled refresh recorded in last_run.json", interval=2)
    assert isinstance(run, dict)
    assert run["refreshed"] == run["entries_total"] > 300
    assert _oldest_atime(tree) > before + 30 * DAY
    sched = _schedule(u)
    assert sched["mode"] == "scrontab" and sched["last_ok_start"] is not None
    logs = list((_state_dir(u) / "logs").glob("scheduled-*.out"))
    assert logs, "the job's output goes to the profile's log dir"

    st = json.loads(u.ok(u.ka("cron-status", "--profile", PROFILE, "--json")))
    assert st["installed"] and st["schedule"]["mode"] == "scrontab"

    u.ok(u.ka("uninstall-cron", "--profile", PROFILE))
    text = u.scrontab_text()
    assert BEGIN not in text and "scheduled-refresh.sh" not in text
    assert "30 4 * * * /bin/true" in text and "users-own-entry" in text


def test_scrontab_disabled_by_scancel_is_reported_and_repaired(user: UserSession) -> None:
    u = user
    _setup_profile(u, 20)
    u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "scrontab", "--every", "14"))
    text = u.scrontab_text()
    assert text.count(BEGIN) == 1
    # 14 days → a daily line; the run itself checks the cadence
    cron = [ln for ln in text.splitlines() if "scheduled-refresh.sh" in ln and not ln.startswith("#")]
    assert len(cron) == 1 and cron[0].split()[2:5] == ["*", "*", "*"], cron
    jobs = wait_for(lambda: u.queue(JOB), 20, "the cron job in the queue")
    u.ok(u.run("scancel", jobs[0][0]))
    wait_for(lambda: "#DISABLED" in u.scrontab_text(), 30, "Slurm to disable the scancelled line")

    doc = u.ka("doctor", "--profile", PROFILE, "--json")
    assert doc.returncode == 1, doc.stdout + doc.stderr
    sched = [f for f in json.loads(doc.stdout)["findings"] if f["check"] == "schedule"]
    assert any(f["severity"] == "error" and "disabled" in f["message"] for f in sched), sched

    rep = u.ka("repair", "--profile", PROFILE)
    assert "reinstalled" in rep.stdout, rep.stdout + rep.stderr
    text = u.scrontab_text()
    assert "#DISABLED" not in text and text.count(BEGIN) == 1
    doc = u.ka("doctor", "--profile", PROFILE, "--json")
    sched = [f for f in json.loads(doc.stdout)["findings"] if f["check"] == "schedule"]
    assert all(f["severity"] not in ("warning", "error") for f in sched), sched


def test_sbatch_chain_refreshes_submits_successor_and_repair_restores_one(user: UserSession) -> None:
    u = user
    tree = _setup_profile(u)
    before = _oldest_atime(tree)
    out = u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "sbatch", "--every", "10m"))
    first = out.split("submitted job ")[1].split()[0]

    # the first link runs now, refreshes, and leaves exactly one successor pending
    def successor() -> list[tuple[str, str]]:
        q = u.queue(JOB)
        return q if q and all(j != first for j, _ in q) and _last_run(u) else []

    q = wait_for(successor, 90, "the first link to finish and a successor to be pending")
    assert len(q) == 1 and q[0][1] == "PENDING", q
    assert _last_run(u)["status"] == "complete"
    assert _oldest_atime(tree) > before + 30 * DAY
    sched = _schedule(u)
    assert sched["chain_job_id"] == q[0][0] and sched["last_ok_start"] is not None
    out = (_state_dir(u) / "logs" / f"scheduled-{first}.out").read_text()
    assert "submitted job" in out, out

    # installing again does not start a second chain
    u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "sbatch", "--every", "10m"))
    assert [j for j, _ in u.queue(JOB)] == [q[0][0]]

    # break the chain → doctor says so → repair restores exactly one link
    u.ok(u.run("scancel", q[0][0]))
    wait_for(lambda: not u.queue(JOB), 20, "the cancelled link to leave the queue")
    doc = u.ka("doctor", "--profile", PROFILE, "--json")
    assert doc.returncode == 1
    msgs = [f["message"] for f in json.loads(doc.stdout)["findings"] if f["severity"] == "error"]
    assert any("chain broken" in m for m in msgs), msgs
    rep = u.ka("repair", "--profile", PROFILE)
    assert "resubmitted the broken chain" in rep.stdout, rep.stdout + rep.stderr
    u.ka("repair", "--profile", PROFILE)  # a second repair must not add a second chain
    q2 = u.queue(JOB)
    assert len(q2) == 1 and q2[0][0] != q[0][0], q2

    u.ok(u.ka("uninstall-cron", "--profile", PROFILE))
    wait_for(lambda: not u.queue(JOB), 20, "uninstall to cancel the pending link")


def test_crontab_mode_block_is_idempotent_and_removed_alone(user: UserSession) -> None:
    """crontab (the no-Slurm fallback) edits the real user crontab; cron itself is not started
    here, the cadence check it relies on is shared with scrontab (tested above and in the unit tests)."""
    u = user
    _setup_profile(u, 10)
    p = u.run("sh", "-c", "printf '15 2 * * * echo mine\\n' | crontab -")
    assert p.returncode == 0, p.stderr
    try:
        for _ in range(2):
            u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "crontab", "--every", "14d"))
        text = u.ok(u.run("crontab", "-l"))
        assert text.count(BEGIN) == 1 and "15 2 * * * echo mine" in text
        u.ok(u.ka("uninstall-cron", "--profile", PROFILE))
        text = u.ok(u.run("crontab", "-l"))
        assert BEGIN not in text and "15 2 * * * echo mine" in text
    finally:
        u.run("crontab", "-r")


def test_chain_job_killed_at_time_limit_still_chains_and_next_run_resumes(user: UserSession) -> None:
    u = user
    rate_opts = _throttle_opts(u)
    _setup_profile(u, 3000, "--time-limit", "1", "--workers", "1", "--unit-size", "50", *rate_opts)
    out = u.ok(u.ka("install-cron", "--profile", PROFILE, "--mode", "sbatch", "--every", "2m"))
    first = out.split("submitted job ")[1].split()[0]
    # the link hits its 1-minute limit mid-refresh: Slurm TERMs it, the trap chains
    q = wait_for(lambda: (q := u.queue(JOB)) and all(j != first for j, _ in q) and q, 180,
                 "the killed link's successor")
    assert len(q) == 1, q
    # the trap submits the successor first, then waits for the refresh to finish its units in
    # flight and record the run: wait for that record
    try:
        r = wait_for(lambda: (r := _last_run(u)) and r.get("status") == "interrupted" and r, 60,
                     "the killed link's run record")
    except BaseException:
        _dump_logs(u)
        raise
    assert isinstance(r, dict)
    done_first = r["units_run"]
    assert 0 < done_first < r["units_total"]
    log = (_state_dir(u) / "logs" / f"scheduled-{first}.out").read_text()
    assert "got SIGTERM" in log and "submitted job" in log, log
    # the successor (due 2 minutes later) resumes from the checkpoint: start it now, and stop it
    # (scancel → TERM) once it has said so; its log tells how much of the plan was already done
    second = q[0][0]
    subprocess.run(["scontrol", "update", f"JobId={second}", "StartTime=now"], check=True, capture_output=True)
    out2 = _state_dir(u) / "logs" / f"scheduled-{second}.out"
    wait_for(lambda: out2.exists() and "resuming plan" in out2.read_text(), 90, "the next link to resume")
    m = re.search(r"resuming plan \S+: (\d+)/(\d+) units done", out2.read_text())
    assert m, out2.read_text()
    assert int(m.group(1)) >= done_first and int(m.group(2)) == r["units_total"], (m.group(0), r)
    u.ok(u.run("scancel", second))
    # stopped in turn, the second link records its run: resumed, with the first link's units
    try:
        r2 = wait_for(lambda: (x := _last_run(u)) and x.get("started", 0) > r["started"]
                      and x.get("status") in ("interrupted", "complete") and x, 60,
                      "the second link's run record")  # fmt: skip
    except BaseException:
        _dump_logs(u)
        raise
    assert isinstance(r2, dict)
    assert r2["resumed"] is True and r2["units_done_before"] >= done_first, r2
    u.ok(u.ka("uninstall-cron", "--profile", PROFILE))


def _dump_logs(u: UserSession) -> None:
    """On a failure: what the job and the refresh wrote, for the test report."""
    for p in sorted((_state_dir(u) / "logs").glob("*")):
        with contextlib.suppress(OSError):
            print(f"==== {p.name}\n{p.read_text()[-6000:]}")
    with contextlib.suppress(OSError):
        print(f"==== last_run.json\n{(_state_dir(u) / 'datasets' / 'ds' / 'last_run.json').read_text()}")


def _throttle_opts(u: UserSession) -> list[str]:
    """A throttle so a refresh of a few thousand files outlives a 1-minute job."""
    assert "--max-rate" in u.ka("init", "--help").stdout
    return ["--max-rate", "20"]
