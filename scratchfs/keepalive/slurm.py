"""Thin wrappers around sbatch, squeue, scancel and scrontab, plus job id parsing.

Every query uses an explicit ``-o`` format (squeue's default format cuts job names to 8
characters) with the job name last, so names of any length and with any characters survive.
Parsing is pure and tested on its own; the wrappers only run the commands.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import EnvironmentProblem, ExternalFailure

log = logging.getLogger(__name__)

# squeue states a job can be in while it may still run (ours to wait for, not to relaunch)
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")
_SEP = "\x1f"  # unit separator: never part of a job id, state or user name
SQUEUE_FORMAT = _SEP.join(["%i", "%A", "%F", "%K", "%T", "%u", "%r", "%j"])
TIMEOUT = 60.0


@dataclass(frozen=True)
class JobId:
    """A Slurm job id as printed: ``123``, ``123_7`` (array task) or ``123_[1-4%2]`` (pending tasks)."""

    job: int
    task: str = ""  # "", "7" or "[1-4%2]"

    @property
    def is_array(self) -> bool:
        return bool(self.task)

    def __str__(self) -> str:
        return f"{self.job}_{self.task}" if self.task else str(self.job)


_JOBID_RE = re.compile(r"(\d+)(?:_(\d+|\[[0-9,\-%:]+\]))?(?:\+\d+)?")


def parse_job_id(text: str) -> JobId:
    """``'123'`` / ``'123_7'`` / ``'123_[1-4%2]'`` / ``'123;cluster'`` → JobId; ValueError otherwise."""
    t = text.strip().split(";", 1)[0]
    m = _JOBID_RE.fullmatch(t)
    if not m:
        raise ValueError(f"not a Slurm job id: {text!r}")
    return JobId(int(m.group(1)), m.group(2) or "")


@dataclass(frozen=True)
class QueuedJob:
    job_id: JobId  # as squeue shows it (array pending ranges included)
    raw_id: int  # %A: this task's own job id
    array_job: int  # %F: the array's job id (== raw_id for non-array jobs)
    state: str
    user: str
    reason: str
    name: str

    @property
    def base_job(self) -> int:
        """The id to cancel or match a submission by: the array job id for array tasks."""
        return self.array_job or self.raw_id

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def parse_squeue(text: str) -> list[QueuedJob]:
    """Parse ``squeue -h -o SQUEUE_FORMAT`` output (pure)."""
    out: list[QueuedJob] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(_SEP, 7)
        if len(parts) != 8:
            log.debug("unexpected squeue line %r", line)
            continue
        ident, raw, arr, _task, state, user, reason, name = parts
        try:
            jid = parse_job_id(ident)
            raw_i = int(raw)
        except ValueError:
            log.debug("unexpected squeue job id in %r", line)
            continue
        arr_i = int(arr) if arr.strip().isdigit() else raw_i
        out.append(QueuedJob(jid, raw_i, arr_i, state.strip(), user.strip(), reason.strip(), name))
    return out


def name_matches(job_name: str, pattern: str, prefix: bool) -> bool:
    """Exact name match, or prefix match when *prefix*."""
    return job_name.startswith(pattern) if prefix else job_name == pattern


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # a job submitting its successor must not hand its own allocation's settings down
    for k in list(env):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("SLURM_CONF",):
            del env[k]
    return env


def _run(cmd: Sequence[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise EnvironmentProblem(f"{cmd[0]} not found: Slurm client commands are needed on PATH")
    log.debug("running %s", " ".join(cmd))
    try:
        p = subprocess.run([exe, *cmd[1:]], input=input, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    except subprocess.TimeoutExpired:
        raise ExternalFailure(f"{cmd[0]} did not answer within {TIMEOUT:.0f}s (is slurmctld reachable?)") from None
    if check and p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise ExternalFailure(f"{' '.join(cmd[:2])} failed: {msg[-1] if msg else f'exit {p.returncode}'}")
    return p


def available() -> bool:
    """True when the Slurm client commands we use are on PATH."""
    return all(shutil.which(c) for c in ("sbatch", "squeue", "scancel"))


def squeue(user: str | None = None, job_ids: Iterable[int] = ()) -> list[QueuedJob]:
    """Jobs in the queue (every state squeue still shows) for *user* and/or *job_ids*."""
    cmd = ["squeue", "-h", "-r", "-o", SQUEUE_FORMAT]
    ids = [str(j) for j in job_ids]
    if ids:
        cmd += ["-j", ",".join(ids)]
    if user:
        cmd += ["-u", user]
    p = _run(cmd, check=False)
    if p.returncode != 0:
        err = (p.stderr or "").strip()
        if ids and "Invalid job id" in err:
            return []  # all of them already gone from the controller
        raise ExternalFailure(f"squeue failed: {err.splitlines()[-1] if err else p.returncode}")
    return parse_squeue(p.stdout)


def find_jobs(name: str, *, prefix: bool = False, user: str | None = None) -> list[QueuedJob]:
    """Active jobs (pending, running, …) of *user* whose name matches."""
    return [j for j in squeue(user=user) if j.active and name_matches(j.name, name, prefix)]


def sbatch(args: Sequence[str], script: str | None = None, script_path: str | None = None,
           script_args: Sequence[str] = ()) -> JobId:
    """Submit; returns the job id. *script* is given on stdin, or *script_path* (with *script_args*)."""
    cmd = ["sbatch", "--parsable", *args]
    if script_path:
        cmd += [script_path, *script_args]
    p = _run(cmd, input=script)
    return parse_job_id(p.stdout.strip().splitlines()[-1])


def scancel(job_ids: Iterable[int | str | JobId]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])


def current_user() -> str:
    import getpass

    return getpass.getuser()


# -- scrontab -----------------------------------------------------------------------------------

SCRONTAB_DISABLED = "disabled"
SCRONTAB_MISSING = "missing"
SCRONTAB_ENABLED = "enabled"


def scrontab_state() -> tuple[str, str]:
    """(``enabled`` | ``disabled`` | ``missing``, detail) — ``disabled`` when the cluster says so."""
    if shutil.which("scrontab") is None:
        return SCRONTAB_MISSING, "scrontab is not installed"
    p = _run(["scrontab", "-l"], check=False)
    err = ((p.stderr or "") + (p.stdout or "")).strip()
    if p.returncode == 0:
        return SCRONTAB_ENABLED, ""
    low = err.lower()
    if "disabled" in low or "scronparameters" in low:
        return SCRONTAB_DISABLED, err.splitlines()[-1] if err else "scrontab is disabled on this cluster"
    if "no crontab" in low:
        return SCRONTAB_ENABLED, ""
    return SCRONTAB_DISABLED, err.splitlines()[-1] if err else f"scrontab -l exited {p.returncode}"


def scrontab_read() -> str:
    p = _run(["scrontab", "-l"], check=False)
    if p.returncode == 0:
        return p.stdout
    said = ((p.stderr or "") + (p.stdout or "")).strip()
    if "no crontab" in said.lower():
        return ""
    raise ExternalFailure(f"scrontab -l failed: {said or p.returncode}")


def scrontab_write(text: str) -> None:
    """Replace the user's scrontab with *text* (scrontab validates it; errors are reported)."""
    with tempfile.NamedTemporaryFile("w", prefix="scratchfs-scrontab.", suffix=".txt", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        _run(["scrontab", path])
    finally:
        os.unlink(path)


def crontab_read() -> str:
    p = _run(["crontab", "-l"], check=False)
    if p.returncode == 0:
        return p.stdout
    said = ((p.stderr or "") + (p.stdout or "")).strip()
    if "no crontab" in said.lower():
        return ""
    raise ExternalFailure(f"crontab -l failed: {said or p.returncode}")


def crontab_write(text: str) -> None:
    if text.strip():
        _run(["crontab", "-"], input=text)
    else:
        _run(["crontab", "-r"], check=False)
