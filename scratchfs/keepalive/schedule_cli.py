"""Scheduling verbs of ``scratch-keepalive`` / ``scratchfs keepalive``, and the hooks doctor uses.

User verbs: ``install-cron [--mode auto|scrontab|sbatch|crontab] [--every DAYS]``,
``uninstall-cron``, ``cron-status [--json]``. Verbs run by the scheduled job itself:
``scheduled-run`` (check the cadence, run ``refresh --all``, record the outcome) and
``chain-next`` (submit the next link of a self-resubmitting job).

    python -m scratchfs.keepalive.schedule_cli scheduled-run --profile NAME --mode cron
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ScratchfsError
from . import paths
from . import schedule as sch
from .profiles import Profile, load_profile

log = logging.getLogger(__name__)

PROG = "scratch-keepalive"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--profile", help="site profile (default: the one set by init)")
    p.add_argument("--debug", action="store_true", help="log debugging detail to stderr")
    return p


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


# -- hooks for doctor / forecast -----------------------------------------------------------------

def doctor_findings(profile_name: str, profile: Profile, state_dir: Path | None = None) -> list[Any]:
    """Schedule findings as doctor's Finding objects (dicts if that class is unavailable)."""
    raw = sch.findings(profile_name, profile, state_dir)
    try:
        from .doctor import Finding
    except ImportError:  # pragma: no cover - doctor is part of the same package
        return raw
    return [Finding.coerce(d, check="schedule") for d in raw]


def refresh_scheduled(profile_name: str, profile: Profile, state_dir: Path | None = None) -> bool:
    """Is ``refresh --all`` of this profile scheduled (by any mode)? Read from the record only."""
    st = sch.load_state(state_dir or paths.state_dir(profile_name, profile))
    return bool(st and st.mode)


# -- user verbs ----------------------------------------------------------------------------------

def cmd_install(args: argparse.Namespace) -> int:
    name, profile = load_profile(args.profile)
    start_in = 0.0
    if args.start_in:
        from ..units import parse_duration

        start_in = parse_duration(args.start_in)
    st, done = sch.install(name, profile, mode=args.mode, every=args.every, start_in=start_in)
    for line in done:
        print(line)
    print(f"profile {name}: refresh --all every {sch.fmt_every(st.every_s)} via {st.mode}; "
          f"logs in {paths.log_dir(name, profile)}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    name, profile = load_profile(args.profile)
    for line in sch.uninstall(name, profile):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name, profile = load_profile(args.profile)
    sdir = paths.state_dir(name, profile)
    st = sch.load_state(sdir)
    fs = sch.findings(name, profile, sdir)
    if args.json:
        _emit_json({"profile": name, "installed": bool(st and st.mode),
                    "schedule": st.to_json() if st else None, "job_name": sch.job_name(name),
                    "log_dir": str(paths.log_dir(name, profile)), "findings": fs})
    else:
        if st and st.mode:
            last = st.runs[-1] if st.runs else None
            print(f"profile {name}: {st.mode}, every {sch.fmt_every(st.every_s)}"
                  + (f", chain job {st.chain_job_id}" if st.mode == "sbatch" else ""))
            if last:
                print(f"last scheduled run: job {last.get('job') or '-'} started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['start']))}, "
                      f"status {last.get('rc', 'running')}")
        for f in fs:
            print(f"{f['severity'].upper():<7} {f['message']}")
    return 1 if any(f["severity"] in ("warning", "error") for f in fs) else 0


# -- verbs run by the scheduled job --------------------------------------------------------------

def _target(args: argparse.Namespace) -> sch.Target:
    if getattr(args, "watcher", False):
        from ..jobs import watcher_target

        return watcher_target()
    return sch.keepalive_target(*load_profile(args.profile))


def cmd_scheduled_run(args: argparse.Namespace) -> int:
    """Check the cadence (cron modes), run the target's command in a child, record the outcome."""
    t = _target(args)
    sdir, name = t.state_dir, t.key
    now = time.time()
    with sch.locked(sdir, name):
        st = sch.load_state(sdir)
        if st is None or not st.mode:
            print(f"{name}: no schedule installed; nothing to do")
            return 0
        if args.mode == "cron":
            _, period = sch.cron_spec(st.every_s, t.seed)
            if not sch.is_due(st.last_ok_start, now, st.every_s, period):
                print(f"{name}: not due (last successful run started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.last_ok_start or 0))}, "
                      f"every {sch.fmt_every(st.every_s)})")
                return 0
        run: dict[str, Any] = {"start": now, "job": args.job or "", "mode": args.mode, "pid": os.getpid()}
        st.runs.append(run)
        sch.save_state(sdir, st)
    cmd = list(t.command)
    log.info("running %s", " ".join(cmd))
    child = subprocess.Popen(cmd)
    got: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        got.append(signum)
        try:
            child.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    rc = child.wait()
    with sch.locked(sdir, name):
        st = sch.load_state(sdir) or sch.ScheduleState()
        for r in reversed(st.runs):
            if r.get("start") == now and r.get("pid") == os.getpid():
                r.update(end=time.time(), rc=rc, signal=got[0] if got else None)
                break
        if rc in (0, 1) and not got:  # 1: partial (some files failed) — the pass is complete
            st.last_ok_start = now
        sch.save_state(sdir, st)
    print(f"{name}: run ended with status {rc}" + (" after a stop signal" if got else ""))
    return rc


def cmd_chain_next(args: argparse.Namespace) -> int:
    print(sch.chain_next_target(_target(args), from_job=args.from_job or ""))
    return 0


# -- registration ----------------------------------------------------------------------------------

def register_keepalive(sub: Any) -> None:
    """Add the scheduling verbs to a keepalive subparsers object (both entry points use this)."""
    common = _common()

    def cmd(name: str, func: Any, help: str | None, description: str) -> argparse.ArgumentParser:
        kw: dict[str, Any] = {"help": help} if help else {}
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], description=description, **kw)
        p.set_defaults(func=func, prog_name=PROG)
        return p

    p = cmd("install-cron", cmd_install, "schedule refresh --all every N days (scrontab, sbatch chain or crontab)",
            "Schedule `refresh --all` of the profile every N days. auto: scrontab when the cluster enables it, "
            "else a self-resubmitting Slurm job, else the user's crontab. Idempotent.")
    p.add_argument("--mode", choices=("auto", *sch.MODES), default="auto")
    p.add_argument("--every", help="cadence: days (14) or a duration (14d, 12h, 5m); default: the profile's")
    p.add_argument("--start-in", help="sbatch: delay before the first run (default: now)")

    p = cmd("uninstall-cron", cmd_uninstall, "remove the scheduled refresh (only our entries)",
            "Remove our scrontab/crontab block and cancel the pending chain job; other entries are untouched.")

    p = cmd("cron-status", cmd_status, "the scheduled refresh: mode, chain job, last runs",
            "Show how refreshes of the profile are scheduled and whether the schedule is healthy.")
    p.add_argument("--json", action="store_true")

    p = cmd("scheduled-run", cmd_scheduled_run, None, "run by the scheduled job: refresh --all if due")
    p.add_argument("--mode", choices=("cron", "chain"), default="cron")
    p.add_argument("--job", default="")
    p.add_argument("--watcher", action="store_true", help="the tracked-jobs watcher instead of a profile")

    p = cmd("chain-next", cmd_chain_next, None, "run by a chain job: submit its successor")
    p.add_argument("--from-job", default="")
    p.add_argument("--watcher", action="store_true", help="the tracked-jobs watcher instead of a profile")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    register_keepalive(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except ScratchfsError as e:
        log.debug("command failed", exc_info=True)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
