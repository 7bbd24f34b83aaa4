"""Policy-aware, resumable refresh of one dataset.

A run: refuse where the site forbids refreshing; skip disabled and expired datasets; take the
dataset's lock (a live holder → BusyError "already running (pid …)", a dead one's lock is
taken over); re-check that the path still resolves inside the allowed roots; resume the stored
plan if the checkpoint is usable, else plan afresh; execute the remaining units (in this
process for one worker, else in ``workers`` forked processes that die with it), appending one
journal record per finished unit; when every unit is done write the last-run record and delete
the checkpoint.

After a crash (SIGKILL included) the next run redoes at most the units that were in flight:
at most ``2 × workers`` units are handed out (each logged as "unit N start") before their
records are journaled.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import multiprocessing
import os
import queue
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, PermissionRefused
from ..locking import Lock, LockOwner
from ..signals import StopFlag
from ..state import atomic_write_json, read_json
from . import checkpoint as ck
from . import paths
from .plan import DIR_FLAGS, WalkStats, plan_file, plan_tree
from .profiles import Profile
from .progress import Progress
from .registry import DatasetEntry, check_allowed, is_expired
from .touch import DEFAULT_METHOD, Toucher, error_kind, make_toucher

log = logging.getLogger(__name__)

ERROR_SAMPLE = 50  # error messages kept per run (all errors are counted)
UNIT_ERROR_SAMPLE = 5


@dataclass
class RunResult:
    dataset: str
    status: str  # complete | partial | interrupted | expired | disabled
    message: str = ""
    units_total: int = 0
    units_done_before: int = 0
    units_run: int = 0
    entries_total: int = 0
    refreshed: int = 0
    errors: int = 0
    error_sample: list[str] = field(default_factory=list)
    resumed: bool = False
    started: float = 0.0
    finished: float = 0.0
    plan_created: float = 0.0
    log: str = ""
    pid: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def last_run_path(profile_name: str, name: str, profile: Profile | None = None) -> Path:
    return paths.dataset_dir(profile_name, name, profile) / "last_run.json"


def read_last_run(profile_name: str, name: str, profile: Profile | None = None) -> dict[str, Any] | None:
    """The last recorded run of a dataset (None if never run or unreadable)."""
    try:
        d = read_json(last_run_path(profile_name, name, profile))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


class _DirCache:
    """Directory fds of one unit, each component opened with O_NOFOLLOW below the base."""

    def __init__(self, base_fd: int) -> None:
        self.base_fd = base_fd
        self.fds: dict[bytes, int] = {b"": base_fd}

    def get(self, reldir: bytes) -> int:
        fd = self.fds.get(reldir)
        if fd is not None:
            return fd
        parent, _, name = reldir.rpartition(b"/")
        if not name or name in (b".", b".."):
            raise OSError(0, "refusing path component", os.fsdecode(reldir))
        fd = os.open(name, DIR_FLAGS, dir_fd=self.get(parent))
        self.fds[reldir] = fd
        return fd

    def close(self) -> None:
        for k, fd in self.fds.items():
            if k:
                os.close(fd)
        self.fds = {b"": self.base_fd}


def execute_unit(base_fd: int, groups: list[ck.Group], touch: Toucher) -> tuple[int, int, list[str]]:
    """Refresh every entry of a unit: (refreshed, errors, first few error messages)."""
    ok = errors = 0
    sample: list[str] = []
    dirs = _DirCache(base_fd)
    try:
        for reldir, names in groups:
            try:
                fd = dirs.get(reldir)
            except OSError as e:
                errors += len(names)
                if len(sample) < UNIT_ERROR_SAMPLE:
                    sample.append(f"{os.fsdecode(reldir)}/: {error_kind(e.errno or 0)} ({len(names)} entries skipped)")
                continue
            failed = touch(fd, names)
            ok += len(names) - len(failed)
            errors += len(failed)
            for name, err in failed[: max(0, UNIT_ERROR_SAMPLE - len(sample))]:
                sample.append(f"{os.fsdecode(os.path.join(reldir, name))}: {error_kind(err)}")
    finally:
        dirs.close()
    return ok, errors, sample


_WORKER: dict[str, Any] = {}  # set before workers fork: base_fd, plan_fd, method, pid


def _init_worker(parent: int, close: list[int]) -> None:
    """In each worker process: die with the parent, leave signals to it, drop its state fds."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a SIGKILLed refresh takes its workers along
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent stops after the units in flight
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    _WORKER["pid"] = os.getpid()


def _work(uid: int, n: int, offset: int, length: int) -> dict[str, Any]:
    """Execute one unit read from the plan (in the main process or a worker)."""
    _uid, _n, groups = ck.read_unit_at(_WORKER["plan_fd"], offset, length)
    touch = make_toucher(time.time_ns(), _WORKER["method"])
    ok, errs, samp = execute_unit(_WORKER["base_fd"], groups, touch)
    return {"u": uid, "n": n, "ok": ok, "e": errs, "err": samp, "p": _WORKER["pid"], "t": round(time.time(), 3)}


def _prior_totals(done: dict[int, dict[str, Any]]) -> tuple[int, int, list[str]]:
    ok = err = 0
    sample: list[str] = []
    for rec in done.values():
        ok += int(rec.get("ok", 0))
        err += int(rec.get("e", 0))
        if len(sample) < ERROR_SAMPLE:
            sample.extend(rec.get("err", [])[: ERROR_SAMPLE - len(sample)])
    return ok, err, sample


def _load_checkpoint(ddir: Path, name: str, base: str) -> tuple[ck.PlanInfo, ck.JournalState | None] | None:
    plan_p = ddir / ck.PLAN_NAME
    if not plan_p.exists():
        return None
    try:
        info = ck.read_plan_info(plan_p)
        if info.header.get("dataset") != name or info.header.get("base") != base:
            raise ck.CheckpointError("plan belongs to another dataset or path")
        try:
            js = ck.read_journal(ddir / ck.JOURNAL_NAME)
        except FileNotFoundError:
            return info, None
        if js.plan_id != info.plan_id:
            raise ck.CheckpointError("journal belongs to another plan")
        if js.scan.torn:
            log.info("%s: ignoring a torn last journal record", name)
        if js.scan.damaged or js.scan.stopped:
            log.warning("%s: %d damaged journal record(s); those units will be redone", name, js.scan.damaged)
        return info, js
    except (ck.CheckpointError, OSError, ValueError) as e:
        log.warning("%s: checkpoint unusable (%s); starting afresh", name, e)
        ck.remove_checkpoint(ddir)
        return None


def _units_from_plan(plan_p: Path, skip: set[int]) -> Iterator[tuple[int, int, list[ck.Group]]]:
    return ck.iter_plan_units(plan_p, skip)


def refresh_dataset(
    profile_name: str,
    profile: Profile,
    entry: DatasetEntry,
    *,
    today: dt.date,
    workers: int | None = None,
    unit_size: int | None = None,
    method: str = DEFAULT_METHOD,
    stop: StopFlag | None = None,
    progress: bool | None = None,
    log_path: str = "",
    owner: LockOwner | None = None,
    max_rate: float | None = None,
) -> RunResult:
    """Refresh one dataset (see the module docstring). Raises ScratchfsError on refusal."""
    refusal = profile.refusal()
    if refusal:
        raise PermissionRefused(refusal)
    res = RunResult(dataset=entry.name, status="", log=log_path, pid=os.getpid(), started=time.time())
    if not entry.enabled:
        res.status, res.message = "disabled", f"{entry.name}: disabled{': ' + entry.note if entry.note else ''}; not refreshed"
        return res
    if is_expired(entry, today):
        res.status, res.message = "expired", f"{entry.name}: expired (keep-until {entry.keep_until}); not refreshed"
        return res
    workers = max(1, workers or profile.workers)
    unit_size = max(1, unit_size or profile.unit_size)

    ddir = paths.dataset_dir(profile_name, entry.name, profile)
    ddir.mkdir(parents=True, exist_ok=True)
    with Lock(paths.dataset_lock_path(profile_name, entry.name, profile), what=f"refresh of {entry.name}",
              owner=owner) as lock:
        if lock.took_over_stale:
            log.warning("%s: took over the stale lock of a dead refresh", entry.name)
        if not os.path.lexists(entry.path):
            raise NotFoundError(f"{entry.name}: path {entry.path} no longer exists")
        real = check_allowed(Path(entry.path), profile)
        if str(real) != entry.path:
            raise PermissionRefused(f"{entry.name}: {entry.path} now resolves to {real}; refusing to follow it")
        if entry.kind == "image":
            base, units = plan_file(entry.path)
        else:
            base, units = entry.path, None
        rate = profile.max_rate if max_rate is None else max_rate
        return _run(profile_name, profile, entry, res, ddir, base, units, workers, unit_size, method, stop, progress,
                    rate)


def _run(profile_name: str, profile: Profile, entry: DatasetEntry, res: RunResult, ddir: Path, base: str,
         units: list[list[ck.Group]] | None, workers: int, unit_size: int, method: str,
         stop: StopFlag | None, progress: bool | None, max_rate: float = 0.0) -> RunResult:
    name = entry.name
    plan_p, jour_p = ddir / ck.PLAN_NAME, ddir / ck.JOURNAL_NAME
    loaded = _load_checkpoint(ddir, name, base)
    if loaded is not None:
        info, js = loaded
        done = dict(js.done) if js else {}
        done = {u: r for u, r in done.items() if 0 <= u < info.units}
        journal = (ck.Journal(jour_p, info.plan_id, truncate_to=js.scan.end) if js
                   else ck.Journal(jour_p, info.plan_id))
        res.resumed = True
        log.info("%s: resuming plan %s: %d/%d units done", name, info.plan_id, len(done), info.units)
    else:
        ck.remove_checkpoint(ddir)
        header = {"v": ck.VERSION, "id": uuid.uuid4().hex, "dataset": name, "base": base, "kind": entry.kind,
                  "unit_size": unit_size, "created": time.time()}
        wstats = WalkStats()
        t0 = time.monotonic()
        info = ck.write_plan(plan_p, header, units if units is not None else plan_tree(base, unit_size, wstats))
        log.info("%s: planned %s: %d entries in %d units (%d dirs, %d mounts skipped) in %.1fs", name, info.plan_id,
                 info.entries, info.units, wstats.dirs, wstats.skipped_mounts, time.monotonic() - t0)
        done = {}
        journal = ck.Journal(jour_p, info.plan_id)
    res.plan_created = float(info.header.get("created", 0.0))
    res.units_total, res.entries_total, res.units_done_before = info.units, info.entries, len(done)
    ok_total, err_total, sample = _prior_totals(done)
    files_done = sum(info.unit_sizes[u] for u in done)

    bar = None
    if progress is not False:
        bar = Progress(f"refresh {name}", info.units, info.entries, len(done), files_done,
                       tty=None if progress is None else True)
    base_fd = os.open(base, DIR_FLAGS)
    plan_fd = os.open(plan_p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    _WORKER.update(base_fd=base_fd, plan_fd=plan_fd, method=method, pid=os.getpid())
    interrupted = False
    pool = None
    try:
        refs = ck.iter_plan_unit_refs(plan_p, set(done))
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if workers > 1:
            # processes, not threads: one interpreter per worker, so the per-entry system calls of
            # different workers never wait for each other's GIL
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(os.getpid(), [journal.fd]))
        in_flight = 0
        paced_until = time.monotonic()  # max_rate: a unit of n entries may start n/max_rate after the last
        exhausted = False
        while True:
            while not exhausted and in_flight < (2 * workers if pool else 1) and not (stop and stop.is_set()):
                nxt = next(refs, None)
                if nxt is None:
                    exhausted = True
                    break
                if max_rate > 0:
                    delay = paced_until - time.monotonic()
                    if delay > 0:
                        if stop is not None:
                            stop.wait(delay)
                        else:
                            time.sleep(delay)
                    if stop is not None and stop.is_set():
                        break  # the unit was not started: not journaled, the next run does it
                    paced_until = max(paced_until, time.monotonic()) + nxt[1] / max_rate
                log.debug("unit %d start (%d entries)", nxt[0], nxt[1])
                in_flight += 1
                if pool is not None:
                    pool.apply_async(_work, nxt, callback=results.put, error_callback=results.put)
                else:
                    results.put(_work(*nxt))
            if not in_flight:
                break
            try:
                rec = results.get(timeout=0.5)
            except queue.Empty:
                rec = None
            if isinstance(rec, BaseException):
                raise rec
            if rec is not None:
                in_flight -= 1
                journal.append(rec)
                done[rec["u"]] = rec
                res.units_run += 1
                ok_total += rec["ok"]
                err_total += rec["e"]
                files_done += rec["n"]
                if rec["err"] and len(sample) < ERROR_SAMPLE:
                    sample.extend(rec["err"][: ERROR_SAMPLE - len(sample)])
                log.debug("unit %d done: %d refreshed, %d errors", rec["u"], rec["ok"], rec["e"])
            if bar:
                bar.update(len(done), files_done)
            if stop and stop.is_set() and not interrupted:
                interrupted = True
                log.warning("%s: stopping after the units in flight", name)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        journal.sync()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        journal.close()
        os.close(base_fd)
        os.close(plan_fd)
        if bar:
            bar.update(len(done), files_done, force=True)
            bar.close()
    res.refreshed, res.errors, res.error_sample = ok_total, err_total, sample
    res.finished = time.time()
    complete = len(done) == info.units
    if complete:
        res.status = "partial" if err_total else "complete"
        res.message = (f"{name}: {res.status}: {ok_total:,} of {info.entries:,} entries refreshed"
                       + (f", {err_total:,} errors" if err_total else ""))
    else:
        res.status = "interrupted"
        res.message = f"{name}: interrupted: {len(done)}/{info.units} units done; the next run resumes"
    _record(profile_name, profile, name, res, complete)
    if complete:
        ck.remove_checkpoint(ddir)
    log.info("%s", res.message)
    return res


def _record(profile_name: str, profile: Profile, name: str, res: RunResult, complete: bool) -> None:
    prev = read_last_run(profile_name, name, profile) or {}
    rec = res.to_json()
    if complete:
        rec["last_complete"] = {"plan_created": res.plan_created, "finished": res.finished, "status": res.status}
    elif isinstance(prev.get("last_complete"), dict):
        rec["last_complete"] = prev["last_complete"]
    try:
        atomic_write_json(last_run_path(profile_name, name, profile), rec)
    except OSError as e:
        log.warning("%s: cannot record the run: %s", name, e)
