"""Pure logic of scheduling and tracked jobs: cadence, blocks, job ids, squeue parsing, decisions."""

from __future__ import annotations

import pytest

from scratchfs.errors import UsageError
from scratchfs.jobs import TrackedJob, backoff_delay, decide, matching_ids, parse_launch_output
from scratchfs.keepalive import cronblock
from scratchfs.keepalive import schedule as sch
from scratchfs.keepalive import slurm as sl

DAY = 86400.0


def test_every_n_days_is_really_every_n_days_across_month_ends() -> None:
    """A daily cron line plus the cadence check runs every 14 days, not on the 1st/15th/29th."""
    every = 14 * DAY
    spec, period = sch.cron_spec(every, "keepalive: profile br200")
    assert spec.endswith(" * * *") and period == DAY
    start = 1_700_000_000.0
    last = None
    runs = []
    for day in range(120):  # cron fires daily, jobs start 0–50 minutes late
        now = start + day * DAY + (day * 7 % 50) * 60
        if sch.is_due(last, now, every, period):
            runs.append(day)
            last = now
    gaps = {runs[i + 1] - runs[i] for i in range(len(runs) - 1)}
    assert runs[0] == 0 and gaps == {14}, runs


def test_cron_spec_for_short_cadences() -> None:
    assert sch.cron_spec(60, "x") == ("* * * * *", 60.0)
    spec, period = sch.cron_spec(6 * 3600, "x")
    assert period == 3600 and spec.split()[1:] == ["*", "*", "*", "*"]
    with pytest.raises(UsageError):
        sch.cron_spec(0, "x")


def test_parse_every() -> None:
    assert sch.parse_every("14", 7) == 14 * DAY
    assert sch.parse_every("2m", 7) == 120
    assert sch.parse_every(None, 7) == 7 * DAY
    with pytest.raises(UsageError):
        sch.parse_every("10s", 7)


def test_next_begin_delay() -> None:
    assert sch.next_begin_delay(None, 100.0, 50.0) == 0.0
    assert sch.next_begin_delay(100.0, 120.0, 50.0) == 30.0
    assert sch.next_begin_delay(100.0, 500.0, 50.0) == 0.0


@pytest.mark.parametrize(("text", "secs"), [("30", 1800), ("05:30", 330), ("04:00:00", 14400),
                                            ("1-00", 86400), ("2-01:30", 178200), ("1-00:00:10", 86410)])
def test_parse_slurm_time(text: str, secs: int) -> None:
    assert sch.parse_slurm_time(text) == secs


def test_warning_lead_only_for_long_limits() -> None:
    assert sch.warning_lead(60) is None
    assert sch.warning_lead(1200) == 120
    assert sch.warning_lead(4 * 3600) == 300


def test_block_install_is_idempotent_and_removal_keeps_other_lines() -> None:
    user = "# mine\n0 5 * * * /bin/echo hi\n#SCRON -t 5\n1 1 * * * /bin/true\n"
    body = ["#SCRON --job-name=x", "* * * * * /s cron"]
    once = cronblock.with_block(user, "k", body)
    twice = cronblock.with_block(once, "k", body)
    assert once == twice and once.count(cronblock.block_begin("k")) == 1
    assert once.startswith(user)
    other = cronblock.with_block(once, "other", ["2 2 * * * /o"])
    assert cronblock.split_block(other, "k")[1] == body and cronblock.split_block(other, "other")[1] == ["2 2 * * * /o"]
    removed = cronblock.with_block(other, "k", [])
    assert cronblock.block_begin("k") not in removed and "/bin/echo hi" in removed and "2 2 * * * /o" in removed
    assert cronblock.with_block(cronblock.with_block("", "k", body), "k", []) == ""


def test_disabled_lines_detected() -> None:
    block = ["#DISABLED: #SCRON --job-name=x", "#DISABLED: * * * * * /s cron"]
    assert cronblock.disabled_lines(block) == block and cronblock.active_cron_lines(block) == []
    assert cronblock.active_cron_lines(["# c", "* * * * * /s cron"]) == ["* * * * * /s cron"]


@pytest.mark.parametrize(("text", "job", "task"), [("123", 123, ""), ("123_7", 123, "7"),
                                                   ("123_[1-4%2]", 123, "[1-4%2]"), ("77;cluster", 77, ""),
                                                   ("55+1", 55, "")])
def test_parse_job_id(text: str, job: int, task: str) -> None:
    j = sl.parse_job_id(text)
    assert (j.job, j.task) == (job, task)
    assert j.is_array == bool(task)


def test_parse_job_id_rejects_junk() -> None:
    for bad in ("", "abc", "12_", "1_x"):
        with pytest.raises(ValueError):
            sl.parse_job_id(bad)


def _line(*f: str) -> str:
    return "\x1f".join(f)


def test_parse_squeue_keeps_long_names_and_arrays() -> None:
    name = "a-job-name|with-a-bar-and-far-longer-than-eight"
    text = "\n".join([
        _line("10", "10", "N/A", "N/A", "RUNNING", "u", "None", name),
        _line("11_[2-4]", "11", "11", "2-4", "PENDING", "u", "Resources", "sweep"),
        _line("11_1", "12", "11", "1", "RUNNING", "u", "None", "sweep"),
        _line("13", "13", "N/A", "N/A", "COMPLETED", "u", "None", "old"),
        "garbage",
    ])
    jobs = sl.parse_squeue(text)
    assert [j.name for j in jobs] == [name, "sweep", "sweep", "old"]
    assert jobs[1].base_job == 11 and jobs[2].base_job == 11 and jobs[2].raw_id == 12
    assert [j.active for j in jobs] == [True, True, True, False]


def _job(**kw: object) -> TrackedJob:
    base: dict[str, object] = {"name": "train", "command": "sbatch x.sh"}
    base.update(kw)
    return TrackedJob(**base)  # type: ignore[arg-type]


def test_decide_states() -> None:
    now = 10_000.0
    assert decide(_job(), ["5"], False, now).action == "alive"
    assert decide(_job(), ["5"], True, now).action == "alive"  # still running: not finished yet
    assert decide(_job(indicator="/x"), [], True, now).action == "finish"
    assert decide(_job(), [], False, now).action == "relaunch"
    assert decide(_job(finished=True), [], False, now).action == "finished"
    assert decide(_job(cancelled=True), [], False, now).action == "cancelled"
    assert decide(_job(relaunches=3, max_relaunches=3), [], False, now).action == "limit"


def test_decide_backoff_and_grace() -> None:
    j = _job(relaunches=3, backoff_s=60.0, last_launch=1000.0, last_launch_id="9")
    d = decide(j, [], False, 1000.0 + 239)
    assert d.action == "backoff" and d.not_before == 1000.0 + 240
    assert decide(j, [], False, 1000.0 + 240).action == "relaunch"
    # a launch that printed no job id gets a grace period before it counts as dead
    g = _job(last_launch=1000.0, last_launch_id="")
    assert decide(g, [], False, 1010.0).action == "grace"
    assert decide(_job(last_launch=1000.0, last_launch_id="7"), [], False, 1010.0).action == "relaunch"


def test_backoff_delay_doubles_and_caps() -> None:
    assert [backoff_delay(n, 60) for n in range(5)] == [0, 60, 120, 240, 480]
    assert backoff_delay(30, 60, cap_s=3600) == 3600


def test_matching_by_exact_name_or_prefix_and_array_tasks() -> None:
    q = sl.parse_squeue("\n".join([
        _line("20_3", "23", "20", "3", "RUNNING", "u", "None", "sweep-lr0.1"),
        _line("21", "21", "N/A", "N/A", "PENDING", "u", "Priority", "sweep-lr0.01"),
        _line("22", "22", "N/A", "N/A", "COMPLETED", "u", "None", "sweep"),
    ]))
    assert matching_ids(_job(name="sweep"), q) == []
    assert matching_ids(_job(name="sweep-", prefix=True), q) == ["20_3", "21"]
    assert matching_ids(_job(name="sweep-lr0.1"), q) == ["20_3"]


def test_parse_launch_output() -> None:
    assert parse_launch_output("Submitted batch job 4242\n") == "4242"
    assert parse_launch_output("4243;cluster\n") == "4243"
    assert parse_launch_output("hello\n") == ""


def test_watch_loop_keeps_its_cadence_with_injected_time(tmp_path, monkeypatch) -> None:
    """The loop with a fake clock and sleep: no tracked jobs, so no Slurm is consulted."""
    from scratchfs import jobs

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    t = [0.0]
    slept: list[float] = []

    def clock() -> float:
        return t[0]

    def sleep(d: float) -> None:
        slept.append(d)
        t[0] += d + 0.0

    def slow_pass(_rep: object) -> None:
        t[0] += 5.0  # each pass takes 5 s

    assert jobs.watch(60.0, max_passes=4, sleep=sleep, clock=clock, report=slow_pass) == 4
    assert slept == [55.0, 55.0, 55.0]


def test_second_watcher_refused(tmp_path, monkeypatch) -> None:
    from scratchfs import jobs
    from scratchfs.errors import BusyError
    from scratchfs.locking import Lock

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with Lock(jobs.jobs_dir() / "watch.lock", what="tracked-jobs watcher"):
        with pytest.raises(BusyError, match="already running"):
            jobs.watch(60.0, once=True)
