"""Scheduled refreshes: a scrontab entry, a self-resubmitting Slurm job, or the user's crontab.

Three ways to run ``refresh --all`` of a profile every N days:

* ``scrontab`` — Slurm's cron: a marked block (``#SCRON`` options + one cron line) in the
  user's scrontab. Preferred where the cluster enables it.
* ``sbatch`` — a chain: each job refreshes and then submits its successor with
  ``--begin=now+N``, also when the refresh failed or the job is being killed at its time limit
  (a bash trap on TERM and on an early ``--signal=B:USR1``); an interrupted refresh resumes from
  its checkpoint in the next link. At most one chain per user and profile: submissions happen
  under a lock, after checking the queue for a job of the chain's name.
* ``crontab`` — the login node's cron, for machines without Slurm.

Cron cannot say "every N days" (``*/14`` in the day-of-month field restarts every month), so
the cron modes fire daily (hourly / every minute for short test cadences) and the scheduled run
itself checks, against the recorded start of the last successful run, whether the cadence has
elapsed (:func:`is_due`). Everything here is written through ``scratchfs.state``; the schedule
record lives in the profile's state directory, the job output in its log directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EnvironmentProblem, ExternalFailure, UsageError
from ..locking import Lock
from ..state import atomic_write, atomic_write_json, read_json
from . import paths
from . import slurm as sl
from .cronblock import active_cron_lines, disabled_lines, split_block, with_block
from .profiles import Profile, SchedulerDefaults

log = logging.getLogger(__name__)

MODES = ("scrontab", "sbatch", "crontab")
STATE_VERSION = 1
SCRIPT_NAME = "scheduled-refresh.sh"
STATE_NAME = "schedule.json"
LOCK_NAME = "schedule.lock"
DAY = 86400.0
MAX_RUNS_KEPT = 20


# -- pure policy --------------------------------------------------------------------------------

def job_name(profile_name: str) -> str:
    """The Slurm job name of a profile's scheduled refresh (squeue is queried with -o, so
    its length does not matter)."""
    return f"scratchfs-keepalive-{profile_name}"


def cron_slot(seed: str) -> tuple[int, int]:
    """(minute, hour) for the daily run, spread over the night by a hash of *seed*."""
    h = zlib.crc32(seed.encode())
    return h % 60, 1 + (h // 60) % 5  # 01:00 – 05:59


def cron_spec(every_s: float, seed: str) -> tuple[str, float]:
    """(cron time fields, period of firing in seconds) for a cadence of *every_s* seconds."""
    if every_s <= 0:
        raise UsageError("the cadence must be positive")
    minute, hour = cron_slot(seed)
    if every_s < 3600:
        return "* * * * *", 60.0
    if every_s < DAY:
        return f"{minute} * * * *", 3600.0
    return f"{minute} {hour} * * *", DAY


def is_due(last_ok_start: float | None, now: float, every_s: float, period_s: float) -> bool:
    """Has the cadence elapsed since the last successful run started?

    Cron fires every *period_s*; a run whose job started a little late must not push the next
    one a whole period later, so half a period of slack is allowed.
    """
    if last_ok_start is None:
        return True
    return now - last_ok_start >= every_s - period_s / 2


def next_begin_delay(last_ok_start: float | None, now: float, every_s: float) -> float:
    """Seconds from *now* until a resubmitted chain link should start (0 when overdue)."""
    if last_ok_start is None:
        return 0.0
    return max(0.0, last_ok_start + every_s - now)


_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def parse_slurm_time(text: str) -> int:
    """Slurm time limit → seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    t = text.strip()
    m = _TIME_RE.fullmatch(t)
    if not m:
        raise UsageError(f"not a Slurm time limit: {text!r} (examples: 30, 04:00:00, 1-00:00:00)")
    d, a, b, c = m.groups()
    if d is not None:
        hours, mins, secs = int(a), int(b or 0), int(c or 0)
        return ((int(d) * 24 + hours) * 60 + mins) * 60 + secs
    if b is None:
        return int(a) * 60
    if c is None:
        return int(a) * 60 + int(b)
    return (int(a) * 60 + int(b)) * 60 + int(c)


def warning_lead(limit_s: int) -> int | None:
    """Seconds before the time limit to warn the job (``--signal=B:USR1@lead``), or None when the
    limit is too short for Slurm's ~1 minute signal resolution to be useful."""
    if limit_s < 600:
        return None
    return min(300, max(120, limit_s // 20))


def fmt_every(every_s: float) -> str:
    if every_s % DAY == 0:
        n = int(every_s // DAY)
        return f"{n} day{'s' if n != 1 else ''}"
    if every_s % 3600 == 0:
        return f"{int(every_s // 3600)} h"
    if every_s % 60 == 0:
        return f"{int(every_s // 60)} min"
    return f"{every_s:g} s"


def parse_every(text: str | float | None, default_days: float) -> float:
    """``--every``: a number of days (``14``) or a duration (``14d``, ``12h``, ``2m``) → seconds."""
    from ..units import parse_duration

    if text is None or text == "":
        return default_days * DAY
    s = str(text).strip()
    secs = float(s) * DAY if re.fullmatch(r"\d+(\.\d+)?", s) else parse_duration(s)
    if secs < 60:
        raise UsageError(f"--every {text}: the shortest cadence is one minute")
    return secs


# -- what is scheduled ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Something run on a schedule: a profile's ``refresh --all``, or the tracked-jobs watcher."""

    key: str  # in the block markers: "keepalive: profile br200" / "jobs watcher"
    job_name: str
    state_dir: Path
    log_dir: Path
    scheduler: SchedulerDefaults
    select: tuple[str, ...]  # schedule_cli arguments naming this target
    command: tuple[str, ...]  # what a due run executes
    default_every_s: float

    @property
    def seed(self) -> str:
        return self.key


def keepalive_target(profile_name: str, profile: Profile) -> Target:
    return Target(
        key=f"keepalive: profile {profile_name}",
        job_name=job_name(profile_name),
        state_dir=paths.state_dir(profile_name, profile),
        log_dir=paths.log_dir(profile_name, profile),
        scheduler=profile.scheduler,
        select=("--profile", profile_name),
        command=(sys.executable, "-m", "scratchfs.keepalive.cli", "refresh", "--all", "--no-progress",
                 "--profile", profile_name),
        default_every_s=profile.scheduler.cadence_days * DAY,
    )


# -- state ---------------------------------------------------------------------------------------

@dataclass
class ScheduleState:
    mode: str = ""
    every_s: float = 14 * DAY
    installed: float = 0.0
    script: str = ""
    chain_job_id: str = ""
    last_ok_start: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_NAME


def load_state(state_dir: Path) -> ScheduleState | None:
    """The schedule record (None when nothing is installed; a damaged record is a warning and None)."""
    try:
        raw = read_json(state_path(state_dir))
    except (OSError, ValueError) as e:
        log.warning("schedule record %s unreadable (%s); treating as not installed", state_path(state_dir), e)
        return None
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        return None
    fields = {k: raw[k] for k in ScheduleState.__dataclass_fields__ if k in raw}
    try:
        return ScheduleState(**fields)
    except TypeError:
        return None


def save_state(state_dir: Path, st: ScheduleState | None) -> None:
    if st is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path(state_dir))
        return
    st.runs = st.runs[-MAX_RUNS_KEPT:]
    atomic_write_json(state_path(state_dir), st.to_json())


@contextlib.contextmanager
def locked(state_dir: Path, what: str, wait: float = 120.0) -> Iterator[None]:
    """The schedule lock: every submission and install happens under it, so two submitters
    (a finishing chain link and ``repair``) never both submit."""
    lock = Lock(state_dir / LOCK_NAME, what=f"scheduling of {what}")
    lock.acquire(wait=wait, poll=0.2)
    try:
        yield
    finally:
        lock.release()


# -- the job script ------------------------------------------------------------------------------

_CARRIED_ENV = ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "SLURM_CONF",
                "SCRATCH_KEEPALIVE_PROFILE", "PYTHONPATH")


def render_script(t: Target, python: str, env: dict[str, str]) -> str:
    """The script every mode runs: ``script cron`` (checks the cadence) or ``script chain``."""
    q = shlex.quote
    exports = "\n".join(f"export {k}={q(env[k])}" for k in _CARRIED_ENV if env.get(k))
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    select = " ".join(q(a) for a in t.select)
    return f"""#!/bin/bash
# scratchfs {t.key}: scheduled run.
# Written by install-cron / install-watcher; rewritten on every install, do not edit.
# Usage: {SCRIPT_NAME} cron|chain
export PATH={q(path)}
{exports}
PY={q(python)}
MODE="${{1:-cron}}"
JOB="${{SLURM_JOB_ID:-}}"
stamp() {{ date '+%Y-%m-%dT%H:%M:%S%z'; }}
linked=0
next_link() {{
    [ "$MODE" = chain ] || return 0
    [ "$linked" = 0 ] || return 0
    linked=1
    "$PY" -m scratchfs.keepalive.schedule_cli chain-next {select} --from-job "$JOB" \\
        || echo "$(stamp) could not submit the next link (doctor reports the broken chain)"
}}
child=""
stopping=0
on_signal() {{
    if [ "$stopping" = 1 ]; then  # a repeated signal: pass it on, keep waiting below
        [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
        return 0
    fi
    stopping=1
    echo "$(stamp) job $JOB got SIG$1: stopping the run (its checkpoint is kept) and chaining"
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
    next_link
    # wait returns early when another signal arrives; the job must not end (Slurm then kills
    # what is left of it at once) before the run has recorded where it stopped
    while [ -n "$child" ] && kill -0 "$child" 2>/dev/null; do
        wait "$child"
    done
    echo "$(stamp) the run has stopped"
    exit 143
}}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal INT' INT
echo "$(stamp) scheduled run of {t.key} ($MODE) on $(hostname), job ${{JOB:-none}}"
"$PY" -m scratchfs.keepalive.schedule_cli scheduled-run {select} --mode "$MODE" --job "$JOB" &
child=$!
wait "$child"
rc=$?
child=""
echo "$(stamp) run ended with status $rc"
next_link
exit "$rc"
"""


def write_script(t: Target, python: str | None = None, env: dict[str, str] | None = None) -> Path:
    path = t.state_dir / SCRIPT_NAME
    atomic_write(path, render_script(t, python or sys.executable, dict(env or os.environ)), perms=0o755)
    return path


# -- submission ----------------------------------------------------------------------------------

def _resource_opts(s: SchedulerDefaults) -> list[str]:
    opts = [f"--cpus-per-task={max(1, s.cpus)}"]
    if s.account:
        opts.append(f"--account={s.account}")
    if s.partition:
        opts.append(f"--partition={s.partition}")
    if s.mem:
        opts.append(f"--mem={s.mem}")
    if s.time_limit:
        opts.append(f"--time={s.time_limit}")
        lead = warning_lead(parse_slurm_time(s.time_limit))
        if lead:
            opts.append(f"--signal=B:USR1@{lead}")
    return opts


def sbatch_args(t: Target, begin_in: float) -> list[str]:
    return [f"--job-name={t.job_name}", f"--output={t.log_dir}/scheduled-%j.out", "--open-mode=append",
            f"--begin=now+{int(round(begin_in))}", "--ntasks=1", "--nodes=1", *_resource_opts(t.scheduler)]


def scron_block(t: Target, script: Path, every_s: float) -> list[str]:
    spec, _ = cron_spec(every_s, t.seed)
    opts = [f"--job-name={t.job_name}", f"--output={t.log_dir}/scheduled-%j.out", "--open-mode=append",
            *_resource_opts(t.scheduler)]
    return [f"# every {fmt_every(every_s)}; managed by scratchfs (install-cron / uninstall-cron)",
            f"#SCRON {' '.join(opts)}",
            f"{spec} {script} cron"]


def cron_block(t: Target, script: Path, every_s: float) -> list[str]:
    spec, _ = cron_spec(every_s, t.seed)
    return [f"# every {fmt_every(every_s)}; managed by scratchfs (install-cron / uninstall-cron)",
            f"{spec} {script} cron >> {t.log_dir}/scheduled-cron.log 2>&1"]


def resolve_mode(mode: str) -> str:
    """``auto`` → scrontab if enabled, else sbatch if Slurm is there, else crontab."""
    if mode in MODES:
        return mode
    if mode != "auto":
        raise UsageError(f"unknown mode {mode!r} (auto, {', '.join(MODES)})")
    state, detail = sl.scrontab_state()
    if state == sl.SCRONTAB_ENABLED:
        return "scrontab"
    if sl.available():
        log.info("scrontab unusable (%s); using a self-resubmitting job", detail)
        return "sbatch"
    if shutil.which("crontab"):
        return "crontab"
    raise EnvironmentProblem("no scheduler found: neither Slurm (scrontab/sbatch) nor crontab is available")


def _our_jobs(t: Target, exclude: str = "") -> list[sl.QueuedJob]:
    return [j for j in sl.find_jobs(t.job_name, user=sl.current_user()) if str(j.base_job) != exclude]


def _submit_link(t: Target, st: ScheduleState, begin_in: float) -> str:
    t.log_dir.mkdir(parents=True, exist_ok=True)
    jid = sl.sbatch(sbatch_args(t, begin_in), script_path=st.script, script_args=["chain"])
    st.chain_job_id = str(jid)
    return str(jid)


def _crontab_io(mode: str) -> tuple[Callable[[], str], Callable[[str], None]]:
    return (sl.scrontab_read, sl.scrontab_write) if mode == "scrontab" else (sl.crontab_read, sl.crontab_write)


def _block_for(t: Target, mode: str, script: Path, every_s: float) -> list[str]:
    return scron_block(t, script, every_s) if mode == "scrontab" else cron_block(t, script, every_s)


def install_target(t: Target, mode: str = "auto", every: str | float | None = None, start_in: float = 0.0,
                   now: float | None = None) -> tuple[ScheduleState, list[str]]:
    """Install (idempotently) the schedule of *t*. Returns the state and what was done."""
    mode = resolve_mode(mode)
    every_s = parse_every(every, t.default_every_s / DAY)
    t.state_dir.mkdir(parents=True, exist_ok=True)
    t.log_dir.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    with locked(t.state_dir, t.key):
        prev = load_state(t.state_dir)
        st = prev or ScheduleState()
        if prev and prev.mode and prev.mode != mode:
            done += _remove_artifacts(t, prev.mode)
        script = write_script(t)
        st.mode, st.every_s, st.script = mode, every_s, str(script)
        st.installed = time.time() if now is None else now
        if mode in ("scrontab", "crontab"):
            read, write = _crontab_io(mode)
            text = read()
            new = with_block(text, t.key, _block_for(t, mode, script, every_s))
            if new != text:
                write(new)
                done.append(f"{mode}: installed the block of {t.key} (every {fmt_every(every_s)})")
            else:
                done.append(f"{mode}: block of {t.key} already installed")
        else:
            existing = _our_jobs(t)
            if existing:
                st.chain_job_id = str(existing[0].base_job)
                done.append(f"sbatch: chain already present (job {existing[0].job_id}, {existing[0].state.lower()})")
            else:
                jid = _submit_link(t, st, start_in)
                done.append(f"sbatch: submitted job {jid} (first run "
                            f"{'in ' + fmt_every(start_in) if start_in else 'now'}, then every {fmt_every(every_s)})")
        save_state(t.state_dir, st)
    return st, done


def _remove_artifacts(t: Target, mode: str) -> list[str]:
    done: list[str] = []
    if mode in ("scrontab", "crontab"):
        read, write = _crontab_io(mode)
        text = read()
        _, block = split_block(text, t.key)
        if block:
            write(with_block(text, t.key, []))
            done.append(f"{mode}: removed the block of {t.key}")
    elif mode == "sbatch":
        jobs = _our_jobs(t)
        pending = [j for j in jobs if j.state == "PENDING"]
        if pending:
            sl.scancel(sorted({j.base_job for j in pending}))
            done.append(f"sbatch: cancelled pending job(s) {', '.join(str(j.job_id) for j in pending)}")
        for j in jobs:
            if j.state != "PENDING":
                done.append(f"sbatch: job {j.job_id} is {j.state.lower()}; it finishes and submits no successor")
    return done


def uninstall_target(t: Target) -> list[str]:
    done: list[str] = []
    with locked(t.state_dir, t.key):
        st = load_state(t.state_dir)
        modes = [st.mode] if st and st.mode else []
        # also clean the other places, in case the record was lost
        if "scrontab" not in modes and sl.scrontab_state()[0] == sl.SCRONTAB_ENABLED:
            modes.append("scrontab")
        if "crontab" not in modes and shutil.which("crontab"):
            modes.append("crontab")
        if "sbatch" not in modes and sl.available():
            modes.append("sbatch")
        for m in modes:
            try:
                done += _remove_artifacts(t, m)
            except (EnvironmentProblem, ExternalFailure) as e:
                if st and m == st.mode:
                    raise
                log.debug("skipping %s: %s", m, e)
        save_state(t.state_dir, None)
    return done or [f"nothing was installed for {t.key}"]


def chain_next_target(t: Target, from_job: str = "") -> str:
    """Submit the next link of the chain unless one is already queued (or the chain was removed)."""
    with locked(t.state_dir, t.key):
        st = load_state(t.state_dir)
        if st is None or st.mode != "sbatch":
            return f"no chain installed for {t.key}; no successor submitted"
        others = _our_jobs(t, exclude=from_job)
        if others:
            st.chain_job_id = str(others[0].base_job)
            save_state(t.state_dir, st)
            return f"chain already continues with job {others[0].job_id}; not submitting another"
        jid = _submit_link(t, st, st.every_s)
        save_state(t.state_dir, st)
        return f"submitted job {jid} to begin in {fmt_every(st.every_s)}"


def repair_target(t: Target, now: float | None = None) -> list[str]:
    """Restore a broken schedule: resubmit a chain with no queued job, reinstall a removed or
    Slurm-disabled scrontab/crontab block. Returns what was done."""
    now = time.time() if now is None else now
    if load_state(t.state_dir) is None:
        return []
    done: list[str] = []
    with locked(t.state_dir, t.key):
        st = load_state(t.state_dir)
        if st is None or not st.mode:
            return []
        if not Path(st.script).exists():
            st.script = str(write_script(t))
            done.append(f"rewrote the missing job script {st.script}")
        if st.mode == "sbatch":
            if not _our_jobs(t):
                delay = next_begin_delay(st.last_ok_start, now, st.every_s)
                jid = _submit_link(t, st, delay)
                done.append(f"resubmitted the broken chain of {t.key}: job {jid} begins "
                            f"{'in ' + fmt_every(round(delay)) if delay >= 60 else 'now'}")
        else:
            read, write = _crontab_io(st.mode)
            text = read()
            _, block = split_block(text, t.key)
            if disabled_lines(block) or not active_cron_lines(block):
                write(with_block(text, t.key, _block_for(t, st.mode, Path(st.script), st.every_s)))
                done.append(f"{st.mode}: reinstalled the {'disabled' if block else 'missing'} block of {t.key}")
        save_state(t.state_dir, st)
    return done


def findings_target(t: Target, now: float | None = None) -> list[dict[str, Any]]:
    """Health of the schedule as doctor findings (dicts with severity, message, check, fix)."""
    now = time.time() if now is None else now
    st = load_state(t.state_dir)
    out: list[dict[str, Any]] = []

    def add(sev: str, msg: str, fix: str = "") -> None:
        out.append({"severity": sev, "message": msg, "check": "schedule", "fix": fix})

    if st is None or not st.mode:
        add("info", f"nothing scheduled for {t.key} (install-cron)")
        return out
    try:
        if st.mode == "sbatch":
            jobs = _our_jobs(t)
            if not jobs:
                add("error", f"chain broken: no pending or running job named {t.job_name} "
                             f"(last link {st.chain_job_id or 'unknown'})", "resubmit the chain")
            elif len({j.base_job for j in jobs}) > 1:
                add("warning", f"{len(jobs)} jobs named {t.job_name} queued: "
                               + ", ".join(str(j.job_id) for j in jobs))
            else:
                add("ok", f"chain: job {jobs[0].job_id} {jobs[0].state.lower()} ({jobs[0].reason})")
        else:
            read, _ = _crontab_io(st.mode)
            _, block = split_block(read(), t.key)
            if disabled_lines(block):
                add("error", f"{st.mode} entry of {t.key} was disabled by Slurm (e.g. after scancel): "
                             f"{disabled_lines(block)[0].strip()}", "reinstall the entry")
            elif not active_cron_lines(block):
                add("error", f"{st.mode} entry of {t.key} is missing", "reinstall the entry")
            else:
                add("ok", f"{st.mode} entry installed: every {fmt_every(st.every_s)}")
    except (EnvironmentProblem, ExternalFailure) as e:
        add("warning", f"cannot check the {st.mode} schedule of {t.key}: {e}")
    last = st.runs[-1] if st.runs else None
    if last and last.get("end") and last.get("rc") not in (0, 1):
        add("warning", f"the last scheduled run (job {last.get('job') or '-'}) ended with status {last.get('rc')}; "
                       f"see {t.log_dir}")
    if st.last_ok_start is not None and now - st.last_ok_start > st.every_s * 1.5 + DAY:
        add("warning", "no successful scheduled run since "
                       + time.strftime("%Y-%m-%d %H:%M", time.localtime(st.last_ok_start)))
    return out


# -- the keepalive API (profiles) ------------------------------------------------------------------

def install(profile_name: str, profile: Profile, mode: str = "auto", every: str | float | None = None,
            start_in: float = 0.0, now: float | None = None) -> tuple[ScheduleState, list[str]]:
    return install_target(keepalive_target(profile_name, profile), mode, every, start_in, now)


def uninstall(profile_name: str, profile: Profile) -> list[str]:
    return uninstall_target(keepalive_target(profile_name, profile))


def chain_next(profile_name: str, profile: Profile, from_job: str = "") -> str:
    return chain_next_target(keepalive_target(profile_name, profile), from_job)


def repair(profile_name: str, profile: Profile, state_dir: Path | None = None,
           now: float | None = None) -> list[str]:
    """What ``scratch-keepalive repair`` calls: restore a broken chain or a disabled entry."""
    return repair_target(keepalive_target(profile_name, profile), now)


def findings(profile_name: str, profile: Profile, state_dir: Path | None = None,
             now: float | None = None) -> list[dict[str, Any]]:
    return findings_target(keepalive_target(profile_name, profile), now)
