"""`scratch-keepalive …` and `scratchfs keepalive …`: keep scratch datasets from being purged.

Quickstart::

    scratch-keepalive init --profile br200
    scratch-keepalive add --name mr-rate --path /N/scratch/$USER/datasets/MR-RATE --keep-until 2026-07-31
    scratch-keepalive refresh --name mr-rate
    scratch-keepalive status --name mr-rate
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from ..errors import BusyError, ExternalFailure, NotFoundError, PermissionRefused, ScratchfsError, UsageError
from ..locking import is_locked
from ..signals import StopFlag
from ..units import format_size, parse_duration
from . import hooks, paths
from .doctor import Finding, run_doctor, run_repair
from .forecast import scan_dataset
from .profiles import BUILTIN, TIMESTAMPS, Profile, PurgeRule, load_profile, save_profile
from .refresh import RunResult, refresh_dataset
from .registry import load_registry, make_entry, parse_date, update_registry
from .status import dataset_status, format_status
from .touch import DEFAULT_METHOD, METHODS

log = logging.getLogger(__name__)

PROG = "scratch-keepalive"


def _today() -> dt.date:
    return dt.date.today()


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _profile(args: argparse.Namespace) -> tuple[str, Profile]:
    return load_profile(getattr(args, "profile", None))


# -- init ------------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    name = paths.check_name(args.profile, "profile name")
    try:
        _, base = load_profile(name)
    except NotFoundError:
        if not args.root:
            raise UsageError(f"{name!r} is not a built-in profile ({', '.join(sorted(BUILTIN))}): "
                             "give its scratch roots with --root DIR") from None
        base = Profile(name=name, description=f"user profile {name}", workers=1)
    changes: dict[str, Any] = {}
    if args.root:
        roots = []
        for r in args.root:
            rp = os.path.realpath(os.path.expanduser(r)) if "$" not in r else r
            if "$" not in r and not os.path.isdir(rp):
                raise NotFoundError(f"root {r} is not a directory")
            roots.append(rp)
        changes["roots"] = tuple(roots)
    rule = base.rule
    if args.purge_on or args.purge_age or args.purge_combine:
        stamps = tuple(s.strip() for s in args.purge_on.split(",")) if args.purge_on else rule.timestamps
        age = parse_duration(args.purge_age) / 86400 if args.purge_age else rule.age_days
        changes["rule"] = PurgeRule(stamps, args.purge_combine or rule.combine, age, stated=True)
    elif args.root and name not in BUILTIN:
        changes["rule"] = replace(rule, stated=True)
    if args.refresh is not None:
        changes["refresh_permitted"] = args.refresh
    for k in ("candidate_list", "state_dir", "log_dir", "workers", "unit_size", "description", "max_rate"):
        v = getattr(args, k)
        if v is not None:
            changes[k] = v
    sched = base.scheduler
    s_changes: dict[str, Any] = {k: getattr(args, k) for k in ("account", "partition", "cpus", "mem", "time_limit")
                 if getattr(args, k) is not None}
    if args.cadence:
        s_changes["cadence_days"] = parse_duration(args.cadence) / 86400
    if s_changes:
        changes["scheduler"] = replace(sched, **s_changes)
    prof = replace(base, **changes)
    save_profile(prof, make_default=not args.no_default)
    paths.state_dir(name, prof).mkdir(parents=True, exist_ok=True)
    shown = ", ".join(map(str, prof.expanded_roots())) or ", ".join(prof.roots)
    print(f"profile {name}: roots {shown}; purge when {prof.rule.describe()}; "
          f"refresh {'permitted' if not prof.refusal() else 'NOT permitted'}; written to {paths.config_file()}"
          + ("" if args.no_default else " (default profile)"))
    if prof.refusal():
        print(f"note: {prof.refusal()}")
    return 0


# -- registry commands ------------------------------------------------------------------------------

def cmd_add(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    entry = make_entry(args.name, args.path, args.keep_until, profile, time.time())
    with update_registry(name, profile) as reg:
        if entry.name in reg.datasets:
            raise UsageError(f"dataset {entry.name!r} is already registered (path {reg.datasets[entry.name].path})")
        for other in reg.datasets.values():
            if other.path == entry.path:
                raise UsageError(f"{entry.path} is already registered as {other.name!r}")
        reg.datasets[entry.name] = entry
    print(f"added {entry.name}: {entry.kind} {entry.path}, keep until {entry.keep_until}")
    if profile.refusal():
        print(f"note: {profile.refusal()}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    reg = load_registry(name, profile)
    rows = [asdict(e) for e in sorted(reg.datasets.values(), key=lambda e: e.name)]
    if args.json:
        _emit_json({"profile": name, "datasets": rows})
        return 0
    if not rows:
        print(f"no datasets registered in profile {name}")
        return 0
    print(f"{'NAME':<20} {'KIND':<5} {'KEEP-UNTIL':<10} {'ON':<3} PATH")
    for r in rows:
        print(f"{r['name']:<20} {r['kind']:<5} {r['keep_until']:<10} {'yes' if r['enabled'] else 'no':<3} {r['path']}")
    return 0


def _selected(args: argparse.Namespace, name: str, profile: Profile) -> list[Any]:
    reg = load_registry(name, profile)
    if getattr(args, "name", None):
        return [reg.get(args.name)]
    return sorted(reg.datasets.values(), key=lambda e: e.name)


def cmd_status(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    today = _today()
    items = [dataset_status(name, profile, e, today) for e in _selected(args, name, profile)]
    if args.json:
        _emit_json({"profile": name, "datasets": items})
    elif not items:
        print(f"no datasets registered in profile {name}")
    else:
        print("\n".join(format_status(s) for s in items))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    now = time.time()
    scheduled = hooks.refresh_scheduled(name, profile)
    results = [scan_dataset(e, profile, now, scheduled) for e in _selected(args, name, profile)]
    if args.json:
        _emit_json({"profile": name, "rule": profile.rule.describe(), "now": now,
                    "datasets": [r.to_json() for r in results]})
        return 0
    print(f"profile {name}: purged when {profile.rule.describe()}")
    for r in results:
        age = "n/a" if r.oldest_effective_age_days is None else f"{r.oldest_effective_age_days:.1f} days"
        print(f"{r.name}: {r.files:,} files, {format_size(r.bytes)}; oldest effective age {age}; "
              f"first purge candidates {r.first_candidates or 'none'}")
        print(f"  at risk within {r.cadence_days:g} days: {r.at_risk_files:,} files, {format_size(r.at_risk_bytes)}"
              f" (already candidates: {r.already_candidates_files:,})")
        for w in r.warnings:
            print(f"  warning: {w}")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    with update_registry(name, profile) as reg:
        e = reg.get(args.name)
        if args.keep_until:
            new = parse_date(args.keep_until)
        elif args.by:
            new = max(e.keep_until_date(), _today()) + dt.timedelta(seconds=parse_duration(args.by))
        else:
            raise UsageError("give --keep-until DATE or --by DURATION")
        e.keep_until = new.isoformat()
    print(f"{args.name}: keep until {new.isoformat()}")
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    with update_registry(name, profile) as reg:
        e = reg.get(args.name)
        e.enabled = args.enable
        e.note = (args.note or "") if not args.enable else ""
    print(f"{args.name}: {'enabled' if args.enable else 'disabled'}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    lock_p = paths.dataset_lock_path(name, args.name, profile)
    if is_locked(lock_p):
        raise BusyError(f"refresh of {args.name} is running; stop it first")
    with update_registry(name, profile) as reg:
        reg.get(args.name)
        del reg.datasets[args.name]
    ddir = paths.dataset_dir(name, args.name, profile)
    if ddir.is_dir():
        for child in ddir.iterdir():
            child.unlink()
        ddir.rmdir()
    print(f"removed {args.name} from profile {name} (its files are untouched)")
    return 0


# -- refresh ---------------------------------------------------------------------------------------

def _run_log(name: str, profile: Profile, label: str) -> tuple[str, logging.Handler]:
    d = paths.log_dir(name, profile)
    d.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:  # a new file for every run, even two runs of one process within a second
        path = d / f"refresh-{label}-{stamp}-{os.getpid()}{f'.{n}' if n else ''}.log"
        try:
            h = logging.FileHandler(path, mode="x", encoding="utf-8")
            break
        except FileExistsError:
            n += 1
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    return str(path), h


def cmd_refresh(args: argparse.Namespace) -> int:
    name, profile = _profile(args)
    if bool(args.all) == bool(args.name):
        raise UsageError("give --name NAME or --all")
    refusal = profile.refusal()
    if refusal:
        raise PermissionRefused(refusal)
    reg = load_registry(name, profile)
    entries = [reg.get(args.name)] if args.name else sorted(reg.datasets.values(), key=lambda e: e.name)
    log_path, handler = _run_log(name, profile, args.name or "all")
    pkg = logging.getLogger("scratchfs")
    old_level = pkg.level
    pkg.setLevel(logging.DEBUG)
    pkg.addHandler(handler)
    stop = StopFlag()  # set from a signal handler: must take no lock (see scratchfs.signals)
    prev_term = None
    if threading.current_thread() is threading.main_thread():
        prev_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    results: list[dict[str, Any]] = []
    worst = 0
    try:
        log.info("refresh run of profile %s: %s (log %s)", name, args.name or "all datasets", log_path)
        for e in entries:
            if stop.is_set():
                break
            if args.all and (not e.enabled):
                continue
            try:
                r = refresh_dataset(name, profile, e, today=_today(), workers=args.workers, unit_size=args.unit_size,
                                    max_rate=args.max_rate,
                                    method=args.method, stop=stop, progress=False if args.no_progress else None,
                                    log_path=log_path)
            except ScratchfsError as err:
                if args.name:
                    raise
                log.error("%s: %s", e.name, err)
                results.append({"dataset": e.name, "status": "failed", "message": str(err)})
                worst = max(worst, 1)
                continue
            results.append(r.to_json())
            worst = max(worst, _exit_for(r))
            if not args.json:
                print(r.message)
    finally:
        pkg.removeHandler(handler)
        handler.close()
        pkg.setLevel(old_level)
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    if args.json:
        _emit_json({"profile": name, "log": log_path, "results": results})
    elif args.all:
        print(f"refresh --all: {len(results)} dataset(s); log {log_path}")
    if stop.is_set():
        raise ExternalFailure("refresh stopped by SIGTERM; the next run resumes")
    return worst


def _exit_for(r: RunResult) -> int:
    return {"complete": 0, "expired": 0, "disabled": 0, "partial": 1, "interrupted": 9}.get(r.status, 1)


# -- doctor / repair -------------------------------------------------------------------------------

def _print_findings(findings: list[Finding]) -> None:
    for f in findings:
        who = f"{f.dataset}: " if f.dataset else ""
        fix = f" [repair: {f.fix}]" if f.fix else ""
        print(f"{f.severity.upper():<7} {who}{f.message}{fix}")


def cmd_doctor(args: argparse.Namespace) -> int:
    name, findings = run_doctor(getattr(args, "profile", None), _today())
    bad = any(f.needs_action() for f in findings)
    if args.json:
        _emit_json({"profile": name, "needs_action": bad, "findings": [f.to_json() for f in findings]})
    else:
        _print_findings(findings)
    return 1 if bad else 0


def cmd_repair(args: argparse.Namespace) -> int:
    actions, findings = run_repair(getattr(args, "profile", None), _today())
    bad = any(f.needs_action() for f in findings)
    if args.json:
        _emit_json({"actions": actions, "needs_action": bad, "findings": [f.to_json() for f in findings]})
    else:
        for a in actions or ["nothing to repair"]:
            print(f"repair: {a}")
        remaining = [f for f in findings if f.needs_action()]
        if remaining:
            print("still needing attention:")
            _print_findings(remaining)
    return 1 if bad else 0


# -- parser ----------------------------------------------------------------------------------------

def _common(with_profile: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if with_profile:
        p.add_argument("--profile", help="site profile (default: the one set by init)")
    p.add_argument("--debug", action="store_true", help="log debugging detail to stderr")
    return p


def add_commands(sub: Any) -> Any:
    """Add every keepalive subcommand to *sub*; shared by both entry points. Returns *sub*."""
    common, bare = _common(True), _common(False)

    def cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        parent = bare if name == "init" else common
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[parent], help=help, description=help)
        p.set_defaults(func=func, prog_name=PROG)
        return p

    p = cmd("init", cmd_init, "create or update a site profile and make it the default")
    p.add_argument("--profile", required=True, help="built-in (" + ", ".join(sorted(BUILTIN)) + ") or a new name")
    p.add_argument("--root", action="append", help="allowed scratch root (repeatable; $USER allowed)")
    p.add_argument("--purge-on", help=f"timestamps the site checks, comma-separated ({', '.join(TIMESTAMPS)})")
    p.add_argument("--purge-combine", choices=("all", "any"), help="purged when all (default) or any are old")
    p.add_argument("--purge-age", help="age after which files are purged (e.g. 60d, 8w)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--refresh-permitted", dest="refresh", action="store_true", default=None)
    g.add_argument("--refresh-forbidden", dest="refresh", action="store_false")
    p.add_argument("--candidate-list", help="the site's purge-candidate list file ($USER allowed)")
    p.add_argument("--state-dir")
    p.add_argument("--log-dir")
    p.add_argument("--description")
    p.add_argument("--workers", type=int)
    p.add_argument("--max-rate", type=float, help="refresh at most this many entries per second (0: unlimited)")
    p.add_argument("--unit-size", type=int)
    for k in ("account", "partition", "mem", "time-limit"):
        p.add_argument(f"--{k}", help="scheduler default")
    p.add_argument("--cpus", type=int, help="scheduler default")
    p.add_argument("--cadence", help="refresh cadence (default 14d)")
    p.add_argument("--no-default", action="store_true", help="do not make this the default profile")

    p = cmd("add", cmd_add, "register a dataset (a directory tree or a squashfs image)")
    p.add_argument("--name", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--keep-until", required=True, help="YYYY-MM-DD; not refreshed after this day")

    p = cmd("list", cmd_list, "list registered datasets")
    p.add_argument("--json", action="store_true")

    p = cmd("status", cmd_status, "state, last run and protection of datasets")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")

    p = cmd("forecast", cmd_forecast, "when files become purge candidates under the site rule")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")

    p = cmd("refresh", cmd_refresh, "refresh access times (where the site permits it), resumably")
    p.add_argument("--name")
    p.add_argument("--all", action="store_true", help="every enabled, unexpired dataset of the profile")
    p.add_argument("--workers", type=int, help="parallel workers (default: the profile's)")
    p.add_argument("--max-rate", type=float, help="entries per second at most (default: the profile's; 0: unlimited)")
    p.add_argument("--unit-size", type=int, help="entries per checkpointed unit (default: the profile's)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")

    p = cmd("extend", cmd_extend, "move a dataset's keep-until date")
    p.add_argument("--name", required=True)
    p.add_argument("--keep-until")
    p.add_argument("--by", help="extend by a duration (e.g. 30d) from keep-until or today")

    p = cmd("enable", cmd_enable, "enable a dataset")
    p.add_argument("--name", required=True)
    p.set_defaults(enable=True, note=None)
    p = cmd("disable", cmd_enable, "disable a dataset (kept registered, not refreshed)")
    p.add_argument("--name", required=True)
    p.add_argument("--note", help="why")
    p.set_defaults(enable=False)

    p = cmd("remove", cmd_remove, "unregister a dataset (its files are untouched)")
    p.add_argument("--name", required=True)

    p = cmd("doctor", cmd_doctor, "check profile, roots, registry, checkpoints, locks; exit 1 if action needed")
    p.add_argument("--json", action="store_true")
    p = cmd("repair", cmd_repair, "fix stale locks, orphaned/damaged checkpoints, vanished paths")
    p.add_argument("--json", action="store_true")

    sched = hooks.schedule_cli()
    if sched is not None and hasattr(sched, "register_keepalive"):
        sched.register_keepalive(sub)
    return sub


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    add_commands(parser.add_subparsers(dest="keepalive_command", metavar="COMMAND"))
    return parser


def register(subparsers: Any) -> None:
    """Add the ``keepalive`` command group to the ``scratchfs`` CLI."""
    p = subparsers.add_parser("keepalive", help="keep scratch datasets from being purged",
                              description=(__doc__ or "").splitlines()[0])
    build_parser(p)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(sh)
        root.setLevel(logging.WARNING)
    for h in root.handlers:
        h.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("scratchfs").setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except ScratchfsError as e:
        log.debug("command failed", exc_info=True)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
