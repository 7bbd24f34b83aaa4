"""Tracked Slurm jobs: keep registered jobs alive until their done-indicator file appears.

A tracked job is matched in the queue by exact name or by name prefix (squeue is read with an
explicit format, so names longer than squeue's default column match too). On every check:

* some pending or running job matches → it is alive (array jobs: any task alive counts);
* none matches and the indicator file exists → the job is marked finished;
* none matches, no indicator → its relaunch command is run, at most ``max_relaunches`` times,
  each relaunch waiting ``backoff × 2^(n-1)`` after the previous one (capped).

The decision is the pure :func:`decide` (``now`` injected). State lives in
``$XDG_STATE_HOME/scratchfs/jobs/`` beside keepalive's: ``tracked.json`` (atomic writes under
``state.lock``) and ``watch.lock``, held by a running watcher so two watchers never both
launch. The watcher can itself be scheduled (scrontab, a self-resubmitting job or crontab) with
the keepalive scheduling machinery: :func:`watcher_target`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BusyError, ExternalFailure, NotFoundError, UsageError
from .keepalive import paths as ka_paths
from .keepalive import slurm as sl
from .keepalive.profiles import SchedulerDefaults
from .keepalive.schedule import Target
from .locking import Lock
from .state import atomic_write_json, read_json

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_BACKOFF_S = 60.0
MAX_BACKOFF_S = 6 * 3600.0
DEFAULT_MAX_RELAUNCHES = 10
# A job launched by a command that printed no job id (a wrapper script, say) may reach the queue
# a little later: such a launch is given this long before it counts as dead. With a job id from
# sbatch no grace is needed: sbatch returns once the controller holds the job.
LAUNCH_GRACE_S = 30.0
HISTORY_KEPT = 30
WATCHER_JOB_NAME = "scratchfs-jobs-watcher"


def jobs_dir() -> Path:
    """Where tracked-job state lives (beside keepalive's, in the XDG state dir)."""
    return ka_paths.state_home() / "scratchfs" / "jobs"


@dataclass
class TrackedJob:
    name: str
    command: str
    workdir: str = ""
    prefix: bool = False
    indicator: str = ""
    max_relaunches: int = DEFAULT_MAX_RELAUNCHES
    backoff_s: float = DEFAULT_BACKOFF_S
    finished: bool = False
    cancelled: bool = False
    relaunches: int = 0
    last_launch: float | None = None
    last_launch_id: str = ""  # job id printed by the last launch ('' if none could be read)
    last_seen: float | None = None
    job_ids: list[str] = field(default_factory=list)
    added: float = 0.0
    note: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def event(self, now: float, what: str, **extra: Any) -> None:
        self.history.append({"t": now, "event": what, **extra})
        del self.history[:-HISTORY_KEPT]


# -- pure decision -------------------------------------------------------------------------------

def backoff_delay(relaunches: int, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Wait before relaunch number ``relaunches + 1``: 0 for the first, then base·2^(n-1), capped."""
    if relaunches <= 0:
        return 0.0
    return float(min(cap_s, base_s * (2 ** (relaunches - 1))))


@dataclass(frozen=True)
class Decision:
    action: str  # alive | finish | relaunch | backoff | limit | cancelled | finished | grace
    reason: str
    not_before: float | None = None


def decide(job: TrackedJob, active_ids: list[str], indicator_exists: bool, now: float) -> Decision:
    """What the watcher does with *job* given the matching active queue entries (pure)."""
    if job.finished:
        return Decision("finished", "marked finished")
    if job.cancelled:
        return Decision("cancelled", "cancelled by the user; `jobs relaunch` resumes tracking")
    if active_ids:
        return Decision("alive", "in the queue: " + ", ".join(active_ids[:5]) + (" …" if len(active_ids) > 5 else ""))
    if indicator_exists:
        return Decision("finish", f"no job in the queue and {job.indicator} exists")
    if job.last_launch is not None and not job.last_launch_id and now - job.last_launch < LAUNCH_GRACE_S:
        return Decision("grace", "launched moments ago; waiting for it to show in the queue")
    if job.relaunches >= job.max_relaunches:
        return Decision("limit", f"relaunch limit reached ({job.relaunches}/{job.max_relaunches})")
    wait = backoff_delay(job.relaunches, job.backoff_s)
    if job.last_launch is not None and now < job.last_launch + wait:
        return Decision("backoff", f"backing off until {_fmt_t(job.last_launch + wait)} "
                                   f"(relaunch {job.relaunches + 1}/{job.max_relaunches})", job.last_launch + wait)
    return Decision("relaunch", "no pending or running job matches and the done indicator is absent")


def _fmt_t(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def matching_ids(job: TrackedJob, queue: list[sl.QueuedJob]) -> list[str]:
    return [str(q.job_id) for q in queue if q.active and sl.name_matches(q.name, job.name, job.prefix)]


# -- state ---------------------------------------------------------------------------------------

@dataclass
class JobsState:
    jobs: dict[str, TrackedJob] = field(default_factory=dict)

    def get(self, name: str) -> TrackedJob:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none tracked"
            raise NotFoundError(f"no tracked job {name!r} ({known})") from None

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "jobs": {n: asdict(j) for n, j in sorted(self.jobs.items())}}


def state_file() -> Path:
    return jobs_dir() / "tracked.json"


def load_state() -> JobsState:
    path = state_file()
    try:
        raw = read_json(path, default=None)
    except (OSError, ValueError) as e:
        raise UsageError(f"tracked-jobs state {path} is unreadable ({e}); fix or move it away") from None
    st = JobsState()
    if raw is None:
        return st
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION or not isinstance(raw.get("jobs"), dict):
        raise UsageError(f"tracked-jobs state {path} has an unexpected layout; fix or move it away")
    for n, d in raw["jobs"].items():
        st.jobs[n] = TrackedJob(**{k: d[k] for k in TrackedJob.__dataclass_fields__ if k in d})
    return st


@contextlib.contextmanager
def update_state(wait: float = 30.0) -> Iterator[JobsState]:
    """The state under its lock, saved atomically on clean exit."""
    lock = Lock(jobs_dir() / "state.lock", what="tracked-jobs state")
    lock.acquire(wait=wait, poll=0.05)
    try:
        st = load_state()
        yield st
        atomic_write_json(state_file(), st.to_json())
    finally:
        lock.release()


# -- actions -------------------------------------------------------------------------------------

_SUBMITTED_RE = re.compile(r"Submitted batch job (\d+)")


def parse_launch_output(out: str) -> str:
    """The job id printed by ``sbatch`` (normal or ``--parsable``), '' if none."""
    m = _SUBMITTED_RE.search(out)
    if m:
        return m.group(1)
    for line in reversed(out.strip().splitlines()):
        try:
            return str(sl.parse_job_id(line))
        except ValueError:
            continue
    return ""


def run_launch_command(job: TrackedJob, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run the job's relaunch command in its working directory → (rc, job id, output tail)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}
    cwd = job.workdir or None
    if cwd and not os.path.isdir(cwd):
        return 127, "", f"working directory {cwd} does not exist"
    try:
        p = subprocess.run(job.command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"command did not finish within {timeout:.0f}s"
    out = (p.stdout or "") + (p.stderr or "")
    return p.returncode, parse_launch_output(p.stdout or ""), out.strip()[-300:]


def launch(job: TrackedJob, now: float, why: str, counted: bool = True) -> str:
    """Run the command, record the attempt (counted against the limit unless *counted* is False)."""
    rc, jid, tail = run_launch_command(job)
    job.last_launch = now
    job.last_launch_id = jid
    if counted:
        job.relaunches += 1
    if rc == 0:
        if jid:
            job.job_ids = (job.job_ids + [jid])[-10:]
        job.event(now, "launched", job=jid, why=why)
        return f"{job.name}: launched{' job ' + jid if jid else ''} ({why})"
    job.event(now, "launch-failed", rc=rc, output=tail, why=why)
    return f"{job.name}: launch command failed with status {rc}: {tail.splitlines()[-1] if tail else ''}"


@dataclass
class PassReport:
    lines: list[str] = field(default_factory=list)
    launched: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


def check_once(now: float | None = None, queue: list[sl.QueuedJob] | None = None,
               indicator_exists: Callable[[str], bool] = os.path.exists) -> PassReport:
    """One watcher pass over every tracked job (under the state lock)."""
    rep = PassReport()
    with update_state() as st:
        todo = [j for j in st.jobs.values() if not j.finished and not j.cancelled]
        if not todo:
            rep.lines.append("no unfinished tracked jobs")
            return rep
        if queue is None:
            queue = sl.squeue(user=sl.current_user())
        now = time.time() if now is None else now
        for job in sorted(todo, key=lambda j: j.name):
            ids = matching_ids(job, queue)
            d = decide(job, ids, bool(job.indicator) and indicator_exists(job.indicator), now)
            if d.action == "alive":
                job.last_seen = now
                for i in ids:
                    base = i.split("_", 1)[0]
                    if base not in job.job_ids:
                        job.job_ids = (job.job_ids + [base])[-10:]
                rep.lines.append(f"{job.name}: alive ({d.reason})")
            elif d.action == "finish":
                job.finished = True
                job.event(now, "finished", why=d.reason)
                rep.finished.append(job.name)
                rep.lines.append(f"{job.name}: finished ({d.reason})")
            elif d.action == "relaunch":
                msg = launch(job, now, d.reason)
                rep.launched.append(job.name)
                rep.lines.append(msg)
            else:
                if d.action == "limit" and not (job.history and job.history[-1].get("event") == "limit"):
                    job.event(now, "limit", why=d.reason)
                rep.lines.append(f"{job.name}: {d.action}: {d.reason}")
    return rep


def watch(interval_s: float, *, once: bool = False, max_passes: int | None = None,
          sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
          report: Callable[[PassReport], None] | None = None) -> int:
    """The watcher: hold ``watch.lock`` (a second watcher → BusyError) and check every *interval_s*.

    *sleep* and *clock* are injectable so the loop is tested without real waiting.
    """
    if interval_s <= 0:
        raise UsageError("the interval must be positive")
    with Lock(jobs_dir() / "watch.lock", what="tracked-jobs watcher"):
        passes = 0
        next_t = clock()
        while True:
            rep = check_once()
            passes += 1
            if report:
                report(rep)
            if once or (max_passes is not None and passes >= max_passes):
                return passes
            next_t += interval_s
            delay = next_t - clock()
            if delay < 0:  # a slow pass: skip the missed slots rather than run back-to-back
                next_t = clock()
                delay = 0.0
            sleep(delay)


# -- verbs used by the CLI -----------------------------------------------------------------------

def add(name: str, command: str, *, workdir: str = "", prefix: bool = False, indicator: str = "",
        max_relaunches: int = DEFAULT_MAX_RELAUNCHES, backoff_s: float = DEFAULT_BACKOFF_S,
        now: float | None = None, replace: bool = False) -> TrackedJob:
    if not name.strip():
        raise UsageError("the job name must not be empty")
    if not command.strip():
        raise UsageError("the relaunch command must not be empty")
    if max_relaunches < 0:
        raise UsageError("--max-relaunches must not be negative")
    if backoff_s < 0:
        raise UsageError("--backoff must not be negative")
    now = time.time() if now is None else now
    wd = os.path.abspath(os.path.expanduser(workdir)) if workdir else os.getcwd()
    if not os.path.isdir(wd):
        raise NotFoundError(f"working directory {wd} does not exist")
    ind = os.path.abspath(os.path.join(wd, os.path.expanduser(indicator))) if indicator else ""
    job = TrackedJob(name=name, command=command, workdir=wd, prefix=prefix, indicator=ind,
                     max_relaunches=max_relaunches, backoff_s=backoff_s, added=now)
    with update_state() as st:
        if name in st.jobs and not replace:
            raise UsageError(f"job {name!r} is already tracked (remove it first, or use `jobs relaunch`)")
        job.event(now, "added")
        st.jobs[name] = job
    return job


def active_matches(job: TrackedJob) -> list[str]:
    return matching_ids(job, sl.squeue(user=sl.current_user()))


def launch_now(name: str, *, force: bool = False, reset: bool = True, now: float | None = None) -> str:
    """Run the job's command now (``launch`` / ``relaunch``): clears finished/cancelled and, with
    *reset*, the relaunch counter. Refused while a matching job is queued unless *force*."""
    now = time.time() if now is None else now
    with update_state() as st:
        job = st.get(name)
        ids = active_matches(job)
        if ids and not force:
            raise BusyError(f"{name}: already in the queue ({', '.join(ids)}); use --force to launch another")
        job.finished = job.cancelled = False
        if reset:
            job.relaunches = 0
        return launch(job, now, "requested by the user", counted=False)


def cancel(name: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    with update_state() as st:
        job = st.get(name)
        queue = sl.squeue(user=sl.current_user())
        hits = [q for q in queue if q.active and sl.name_matches(q.name, job.name, job.prefix)]
        if hits:
            sl.scancel(sorted({q.base_job for q in hits}))
        job.cancelled = True
        job.event(now, "cancelled", jobs=[str(q.job_id) for q in hits])
    what = ", ".join(sorted({str(q.base_job) for q in hits})) or "nothing in the queue"
    return f"{name}: cancelled ({what}); no longer relaunched"


def remove(name: str) -> str:
    with update_state() as st:
        st.get(name)
        del st.jobs[name]
    return f"{name}: no longer tracked (its Slurm jobs are untouched)"


def set_finished(name: str, finished: bool, now: float | None = None) -> str:
    now = time.time() if now is None else now
    with update_state() as st:
        job = st.get(name)
        job.finished = finished
        if not finished:
            job.cancelled = False
        job.event(now, "set-finished" if finished else "set-unfinished")
    return f"{name}: marked {'finished' if finished else 'unfinished'}"


def listing(which: str = "all", with_queue: bool = True) -> list[dict[str, Any]]:
    st = load_state()
    queue: list[sl.QueuedJob] | None = None
    if with_queue and sl.available():
        try:
            queue = sl.squeue(user=sl.current_user())
        except ExternalFailure as e:
            log.warning("cannot read the queue: %s", e)
    rows = []
    for job in sorted(st.jobs.values(), key=lambda j: j.name):
        if which == "finished" and not job.finished:
            continue
        if which == "unfinished" and job.finished:
            continue
        d = asdict(job)
        d.pop("history")
        d["in_queue"] = matching_ids(job, queue) if queue is not None else None
        d["status"] = ("finished" if job.finished else "cancelled" if job.cancelled
                       else "queued" if d["in_queue"] else "limit" if job.relaunches >= job.max_relaunches
                       else "waiting" if queue is not None else "unknown")
        rows.append(d)
    return rows


# -- the watcher as a scheduled job ---------------------------------------------------------------

def watcher_settings_path() -> Path:
    return jobs_dir() / "watcher.json"


def save_watcher_resources(account: str = "", partition: str = "", time_limit: str = "", mem: str = "") -> None:
    cur = read_json(watcher_settings_path(), default={}) or {}
    for k, v in (("account", account), ("partition", partition), ("time_limit", time_limit), ("mem", mem)):
        if v:
            cur[k] = v
    atomic_write_json(watcher_settings_path(), cur)


def watcher_target() -> Target:
    """The schedule target of ``jobs run --once`` (shares keepalive's scheduling machinery)."""
    d = jobs_dir()
    try:
        cfg = read_json(watcher_settings_path(), default={}) or {}
    except (OSError, ValueError):
        cfg = {}
    return Target(
        key="jobs watcher",
        job_name=WATCHER_JOB_NAME,
        state_dir=d,
        log_dir=d / "logs",
        scheduler=SchedulerDefaults(account=str(cfg.get("account", "")), partition=str(cfg.get("partition", "")),
                                    cpus=1, mem=str(cfg.get("mem", "500M")),
                                    time_limit=str(cfg.get("time_limit", "00:10:00")), cadence_days=10 / 1440),
        select=("--watcher",),
        command=(sys.executable, "-m", "scratchfs.cli", "jobs", "run", "--once"),
        default_every_s=600.0,
    )
