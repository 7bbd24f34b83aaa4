"""``scratchfs jobs …`` — keep registered Slurm jobs alive until they are done.

    scratchfs jobs launch --name train-run --command "sbatch train.sh" --indicator done.flag
    scratchfs jobs run --interval 10          # the watcher (or: jobs install-watcher)
    scratchfs jobs list --unfinished --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from . import jobs
from .units import parse_duration

log = logging.getLogger(__name__)


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _add_common_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="Slurm job name to match (exact, or a prefix with --prefix)")
    p.add_argument("--command", required=True, help="shell command that (re)submits the job, e.g. 'sbatch run.sh'")
    p.add_argument("--workdir", default="", help="directory the command runs in (default: the current one)")
    p.add_argument("--prefix", action="store_true", help="match every job whose name starts with --name")
    p.add_argument("--indicator", default="", help="file whose existence means the job is done (relative: to --workdir)")
    p.add_argument("--max-relaunches", type=int, default=jobs.DEFAULT_MAX_RELAUNCHES)
    p.add_argument("--backoff", default=f"{int(jobs.DEFAULT_BACKOFF_S)}s",
                   help="wait after the first relaunch, doubled after each further one (default 60s)")


def _add(args: argparse.Namespace) -> jobs.TrackedJob:
    return jobs.add(args.name, args.command, workdir=args.workdir, prefix=args.prefix, indicator=args.indicator,
                    max_relaunches=args.max_relaunches, backoff_s=parse_duration(args.backoff))


def cmd_add(args: argparse.Namespace) -> int:
    job = _add(args)
    print(f"{job.name}: tracked ({'prefix' if job.prefix else 'exact name'}; command {job.command!r} in "
          f"{job.workdir}{'; done when ' + job.indicator + ' exists' if job.indicator else ''})")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    job = _add(args)
    print(f"{job.name}: tracked")
    print(jobs.launch_now(job.name))
    return 0


def cmd_relaunch(args: argparse.Namespace) -> int:
    print(jobs.launch_now(args.name, force=args.force))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    print(jobs.remove(args.name))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    print(jobs.cancel(args.name))
    return 0


def cmd_set_finished(args: argparse.Namespace) -> int:
    print(jobs.set_finished(args.name, args.finished))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    which = "finished" if args.finished else "unfinished" if args.unfinished else "all"
    rows = jobs.listing(which)
    if args.json:
        _emit_json({"jobs": rows})
        return 0
    if not rows:
        print("no tracked jobs" if which == "all" else f"no {which} tracked jobs")
        return 0
    for r in rows:
        q = ", ".join(r["in_queue"]) if r["in_queue"] else "-"
        print(f"{r['name']:<30} {r['status']:<10} queue {q:<20} relaunches {r['relaunches']}/{r['max_relaunches']}"
              f"{'  (prefix)' if r['prefix'] else ''}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    interval = parse_duration(args.interval) if not str(args.interval).isdigit() else float(args.interval) * 60

    def report(rep: jobs.PassReport) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        for line in rep.lines:
            print(f"{stamp}{line}", flush=True)

    if not args.once:
        log.info("watching tracked jobs every %.0f s (Ctrl-C stops)", interval)
    jobs.watch(interval, once=args.once, report=report)
    return 0


def cmd_install_watcher(args: argparse.Namespace) -> int:
    from .keepalive import schedule as sch

    every = args.interval if not str(args.interval).isdigit() else f"{args.interval}m"
    jobs.save_watcher_resources(args.account or "", args.partition or "", args.time or "", args.mem or "")
    st, done = sch.install_target(jobs.watcher_target(), mode=args.mode, every=every)
    for line in done:
        print(line)
    print(f"tracked-jobs watcher: every {sch.fmt_every(st.every_s)} via {st.mode}; "
          f"logs in {jobs.watcher_target().log_dir}")
    return 0


def cmd_uninstall_watcher(args: argparse.Namespace) -> int:
    from .keepalive import schedule as sch

    for line in sch.uninstall_target(jobs.watcher_target()):
        print(line)
    return 0


def cmd_watcher_status(args: argparse.Namespace) -> int:
    from .keepalive import schedule as sch

    t = jobs.watcher_target()
    st = sch.load_state(t.state_dir)
    fs = sch.findings_target(t)
    if args.json:
        _emit_json({"installed": bool(st and st.mode), "schedule": st.to_json() if st else None, "findings": fs})
    else:
        for f in fs:
            print(f"{f['severity'].upper():<7} {f['message']}")
    return 1 if any(f["severity"] in ("warning", "error") for f in fs) else 0


def cmd_repair_watcher(args: argparse.Namespace) -> int:
    from .keepalive import schedule as sch

    for line in sch.repair_target(jobs.watcher_target()) or ["nothing to repair"]:
        print(line)
    return 0


def _setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def register(subparsers: Any) -> None:
    """Add the ``jobs`` command group to the ``scratchfs`` CLI."""
    top = subparsers.add_parser("jobs", help="keep registered Slurm jobs alive until they are done",
                                description=(__doc__ or "").splitlines()[0])
    sub = top.add_subparsers(dest="jobs_command", metavar="COMMAND")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="log debugging detail")

    def cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        def run(args: argparse.Namespace) -> int:
            _setup_logging(getattr(args, "debug", False))
            return int(func(args))

        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=run)
        return p

    p = cmd("run", cmd_run, "the watcher: check every --interval and relaunch dead jobs")
    p.add_argument("--interval", default="10", help="minutes between checks (or a duration: 90s, 2m)")
    p.add_argument("--once", action="store_true", help="one check, then exit (what the scheduled watcher runs)")

    p = cmd("launch", cmd_launch, "track a job and submit it now")
    _add_common_job_args(p)
    p = cmd("add", cmd_add, "track a job that is already submitted (or will be)")
    _add_common_job_args(p)

    p = cmd("remove", cmd_remove, "stop tracking a job (its Slurm jobs are untouched)")
    p.add_argument("--name", required=True)
    p = cmd("cancel", cmd_cancel, "scancel a tracked job's queued jobs and stop relaunching it")
    p.add_argument("--name", required=True)
    p = cmd("relaunch", cmd_relaunch, "run a job's command now and reset its relaunch count")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="even if a matching job is in the queue")

    p = cmd("list", cmd_list, "tracked jobs and what the queue shows for them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--finished", action="store_true")
    g.add_argument("--unfinished", action="store_true")
    p.add_argument("--json", action="store_true")

    p = cmd("set-finished", cmd_set_finished, "mark a job finished (never relaunched)")
    p.add_argument("--name", required=True)
    p.set_defaults(finished=True)
    p = cmd("set-unfinished", cmd_set_finished, "mark a job unfinished again")
    p.add_argument("--name", required=True)
    p.set_defaults(finished=False)

    p = cmd("install-watcher", cmd_install_watcher, "run the watcher by itself: scrontab, sbatch chain or crontab")
    p.add_argument("--mode", choices=("auto", "scrontab", "sbatch", "crontab"), default="auto")
    p.add_argument("--interval", default="10", help="minutes between checks (or a duration)")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit of a watcher job (default 00:10:00)")
    p.add_argument("--mem")
    cmd("uninstall-watcher", cmd_uninstall_watcher, "remove the scheduled watcher")
    p = cmd("watcher-status", cmd_watcher_status, "is the scheduled watcher healthy")
    p.add_argument("--json", action="store_true")
    cmd("repair-watcher", cmd_repair_watcher, "resubmit a broken watcher chain / reinstall a disabled entry")


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    if argv is None:
        argv = sys.argv[1:]
    return cli_main(["jobs", *argv])


if __name__ == "__main__":
    sys.exit(main())
