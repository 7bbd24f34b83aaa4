"""keepalive on real trees in a temp root: refresh, refusals, locks, forecast, doctor/repair, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchfs.keepalive import checkpoint as ck
from scratchfs.keepalive import paths
from scratchfs.keepalive.cli import main
from scratchfs.keepalive.touch import METHODS
from tests.mounts import wait_for

DAY = 86400
OLD_NS = int((time.time() - 100 * DAY) * 1e9)
MTIME_NS = int((time.time() - 400 * DAY) * 1e9)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SCRATCH_KEEPALIVE_PROFILE", raising=False)
    root = tmp_path / "scratch"
    root.mkdir()
    return root


def run(*argv: str, capsys=None) -> tuple[int, str, str]:
    rc = main(list(argv))
    if capsys is None:
        return rc, "", ""
    out, err = capsys.readouterr()
    return rc, out, err


def make_tree(base: Path, dirs: int = 3, files: int = 20) -> list[Path]:
    """A tree with old atimes and known mtimes; returns every entry below *base* (itself included)."""
    made = [base]
    base.mkdir(parents=True, exist_ok=True)
    for d in range(dirs):
        sub = base / f"dir{d}" / "inner"
        sub.mkdir(parents=True)
        made += [sub.parent, sub]
        for i in range(files):
            p = sub / f"file{i}.dat"
            p.write_bytes(b"x" * i)
            made.append(p)
    for p in made:
        os.utime(p, ns=(OLD_NS, MTIME_NS))
    return made


def test_refresh_sets_atime_keeps_mtime_and_never_follows_symlinks(env, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret"
    target.write_text("s")
    os.utime(outside, ns=(OLD_NS, MTIME_NS))
    os.utime(target, ns=(OLD_NS, MTIME_NS))
    ds = env / "ds"
    entries = make_tree(ds)
    link_file, link_dir = ds / "to-secret", ds / "to-outside"
    os.symlink(target, link_file)
    os.symlink(outside, link_dir)
    for link in (link_file, link_dir):
        os.utime(link, ns=(OLD_NS, MTIME_NS), follow_symlinks=False)
    assert run("init", "--profile", "local", "--root", str(env))[0] == 0
    assert run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")[0] == 0
    for method in METHODS:  # the default and the portable way must behave the same
        for p in [*entries, link_file, link_dir]:
            os.utime(p, ns=(OLD_NS, MTIME_NS), follow_symlinks=False)
        before = time.time_ns()
        rc, out, _ = run("refresh", "--name", "ds", "--method", method, "--no-progress", capsys=capsys)
        assert rc == 0, out
        for p in [*entries, link_file, link_dir]:
            st = os.lstat(p)
            assert st.st_atime_ns >= before - 10**9, p  # a coarse clock may round down a little
            assert st.st_mtime_ns == MTIME_NS, p
            assert st.st_ctime_ns >= before - 10**9, p
        for p in (outside, target):
            st = os.stat(p)
            assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_NS, MTIME_NS), f"{p} outside the root was touched"
        assert f"{len(entries) + 2:,} of {len(entries) + 2:,} entries refreshed" in out
    ddir = paths.dataset_dir("local", "ds")
    assert not (ddir / ck.PLAN_NAME).exists() and not (ddir / ck.JOURNAL_NAME).exists()
    rc, out, _ = run("status", "--name", "ds", "--json", capsys=capsys)
    st = json.loads(out)["datasets"][0]
    assert rc == 0 and st["state"] == "ok" and st["last_run"]["status"] == "complete"
    assert st["protected_until"] is not None
    logs = list(paths.log_dir("local").glob("refresh-ds-*.log"))
    assert len(logs) == len(METHODS)  # one log per run


def test_purge_simulation_forecast_then_refresh(env, capsys):
    ds = env / "ds"
    entries = make_tree(ds, dirs=2, files=10)
    young = ds / "young.txt"
    young.write_text("fresh")
    run("init", "--profile", "local", "--root", str(env), "--purge-on", "atime", "--purge-age", "30d")
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")
    capsys.readouterr()
    rc, out, _ = run("forecast", "--name", "ds", "--json", capsys=capsys)
    fc = json.loads(out)["datasets"][0]
    old_files = len([p for p in entries if p.is_file()])
    assert rc == 0 and fc["files"] == old_files + 1
    assert fc["already_candidates_files"] == old_files  # the 100-day-old atimes
    assert fc["oldest_effective_age_days"] >= 99
    assert any("already purge candidates" in w for w in fc["warnings"])
    assert run("refresh", "--name", "ds", "--no-progress")[0] == 0
    capsys.readouterr()
    rc, out, _ = run("forecast", "--name", "ds", "--json", capsys=capsys)
    fc = json.loads(out)["datasets"][0]
    assert fc["already_candidates_files"] == 0 and fc["at_risk_files"] == 0
    assert fc["oldest_effective_age_days"] < 1


def test_forbidden_site_and_generic_refuse(env, capsys):
    ds = env / "ds"
    make_tree(ds, 1, 3)
    run("init", "--profile", "tacc", "--root", str(env))
    rc, out, _ = run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31", capsys=capsys)
    assert rc == 0 and "refresh refused" in out
    rc, _, err = run("refresh", "--name", "ds", capsys=capsys)
    assert rc == 6 and "TACC prohibits" in err and "squashfs image" in err and err.count("\n") == 1
    assert os.stat(ds / "dir0" / "inner" / "file0.dat").st_atime_ns == OLD_NS
    rc, out, _ = run("forecast", "--json", capsys=capsys)
    assert any("forbids refresh" in w for w in json.loads(out)["datasets"][0]["warnings"])
    run("init", "--profile", "generic", "--root", str(env))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")
    capsys.readouterr()
    rc, _, err = run("refresh", "--all", capsys=capsys)
    assert rc == 6 and "forecast-only" in err
    # stating the rule makes it refreshable
    run("init", "--profile", "generic", "--purge-on", "atime", "--purge-age", "30d")
    assert run("refresh", "--all", "--no-progress")[0] == 0


def test_expired_dataset_is_skipped(env, capsys):
    ds = env / "ds"
    make_tree(ds, 1, 3)
    run("init", "--profile", "local", "--root", str(env))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2020-01-01")
    capsys.readouterr()
    rc, out, _ = run("refresh", "--name", "ds", capsys=capsys)
    assert rc == 0 and "expired" in out
    assert os.stat(ds / "dir0" / "inner" / "file1.dat").st_atime_ns == OLD_NS
    rc, out, _ = run("status", "--json", capsys=capsys)
    assert json.loads(out)["datasets"][0]["state"] == "expired"
    rc, out, _ = run("extend", "--name", "ds", "--by", "30d", capsys=capsys)
    assert rc == 0
    rc, out, _ = run("refresh", "--all", "--no-progress", capsys=capsys)
    assert rc == 0 and os.stat(ds / "dir0" / "inner" / "file1.dat").st_atime_ns > OLD_NS


HOLDER = """
import sys
from scratchfs.locking import Lock
lock = Lock(sys.argv[1]); lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_concurrent_refresh_refused_and_stale_lock_taken_over(env, capsys):
    ds = env / "ds"
    make_tree(ds, 1, 3)
    run("init", "--profile", "local", "--root", str(env))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")
    lock_p = paths.dataset_lock_path("local", "ds")
    lock_p.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_p)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        rc, _, err = run("refresh", "--name", "ds", capsys=capsys)
        assert rc == 5 and f"already running (pid {holder.pid}" in err
        rc, out, _ = run("status", "--json", capsys=capsys)
        st = json.loads(out)["datasets"][0]
        assert st["state"] == "running" and st["running_pid"] == holder.pid
    finally:
        holder.kill()  # dies holding the lock: its record stays, the flock goes
        holder.communicate()
    rc, out, _ = run("doctor", "--json", capsys=capsys)
    doc = json.loads(out)
    assert rc == 1 and any(f["check"] == "lock" for f in doc["findings"])
    rc, out, _ = run("refresh", "--name", "ds", "--no-progress", capsys=capsys)
    assert rc == 0 and "complete" in out
    rc, out, _ = run("doctor", capsys=capsys)
    assert rc == 0, out


def test_partial_run_counts_errors_and_resumes_stored_plan(env, tmp_path, capsys):
    """Files removed and a directory swapped for a symlink between planning and execution."""
    ds = env / "ds"
    entries = make_tree(ds, 3, 10)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file0.dat").write_text("x")
    os.utime(outside / "file0.dat", ns=(OLD_NS, MTIME_NS))
    run("init", "--profile", "local", "--root", str(env))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")
    from scratchfs.keepalive.profiles import load_profile
    from scratchfs.keepalive.refresh import refresh_dataset
    from scratchfs.keepalive.registry import load_registry
    from scratchfs.signals import StopFlag

    name, prof = load_profile()
    entry = load_registry(name, prof).get("ds")
    stop = StopFlag()
    stop.set()  # plan, then stop before any unit: the checkpoint holds the plan
    import datetime as dt

    r = refresh_dataset(name, prof, entry, today=dt.date.today(), stop=stop, progress=False, unit_size=7)
    assert r.status == "interrupted" and r.units_run == 0
    capsys.readouterr()
    rc, out, _ = run("status", "--json", capsys=capsys)
    assert json.loads(out)["datasets"][0]["state"] == "interrupted"
    (ds / "dir0" / "inner" / "file3.dat").unlink()
    shutil.rmtree(ds / "dir1" / "inner")
    os.symlink(outside, ds / "dir1" / "inner")
    (ds / "dir2" / "inner" / "new.dat").write_text("added after planning")
    rc, out, _ = run("refresh", "--name", "ds", "--no-progress", capsys=capsys)
    assert rc == 1 and "partial" in out and "11 errors" in out  # 1 vanished + 10 under the swapped dir
    assert os.stat(outside / "file0.dat").st_atime_ns == OLD_NS
    assert os.stat(ds / "dir2" / "inner" / "file5.dat").st_atime_ns > OLD_NS
    assert sum(1 for p in entries if p.exists() and os.lstat(p).st_atime_ns > OLD_NS) == len(entries) - 11
    rc, out, _ = run("status", "--name", "ds", "--json", capsys=capsys)
    st = json.loads(out)["datasets"][0]
    assert st["state"] == "partial" and st["last_run"]["errors"] == 11
    assert any("file3.dat: vanished" in e for e in st["last_run"]["error_sample"])
    rc, out, _ = run("doctor", capsys=capsys)
    assert rc == 1 and "last refresh partial" in out


def test_squashfs_image_dataset(env, tmp_path, capsys):
    src = tmp_path / "src"
    make_tree(src, 1, 5)
    img = env / "data.sqfs"
    subprocess.run(["mksquashfs", str(src), str(img), "-quiet", "-no-progress", "-noappend"], check=True)
    os.utime(img, ns=(OLD_NS, MTIME_NS))
    run("init", "--profile", "local", "--root", str(env), "--purge-age", "30d")
    rc, out, _ = run("add", "--name", "img", "--path", str(img), "--keep-until", "2099-12-31", capsys=capsys)
    assert rc == 0 and "image" in out
    rc, out, _ = run("forecast", "--json", capsys=capsys)
    fc = json.loads(out)["datasets"][0]
    assert fc["kind"] == "image" and fc["files"] == 1 and fc["bytes"] == img.stat().st_size
    assert fc["already_candidates_files"] == 1
    assert run("refresh", "--name", "img", "--no-progress")[0] == 0
    st = os.stat(img)
    assert st.st_atime_ns > OLD_NS and st.st_mtime_ns == MTIME_NS


def test_registry_commands_and_repair(env, capsys):
    a, b = env / "a", env / "b"
    make_tree(a, 1, 2)
    make_tree(b, 1, 2)
    run("init", "--profile", "local", "--root", str(env))
    assert run("add", "--name", "a", "--path", str(a), "--keep-until", "2099-01-01")[0] == 0
    assert run("add", "--name", "b", "--path", str(b), "--keep-until", "2099-01-01")[0] == 0
    capsys.readouterr()
    rc, _, err = run("add", "--name", "a", "--path", str(b), "--keep-until", "2099-01-01", capsys=capsys)
    assert rc == 2 and "already registered" in err
    rc, out, _ = run("list", "--json", capsys=capsys)
    assert [d["name"] for d in json.loads(out)["datasets"]] == ["a", "b"]
    assert run("disable", "--name", "a", "--note", "on hold")[0] == 0
    capsys.readouterr()
    rc, out, _ = run("refresh", "--all", "--json", capsys=capsys)
    assert rc == 0 and [r["dataset"] for r in json.loads(out)["results"]] == ["b"]
    assert run("enable", "--name", "a")[0] == 0
    assert run("extend", "--name", "a", "--keep-until", "2100-01-01")[0] == 0
    # orphaned state, a damaged checkpoint, a vanished path
    orphan = paths.dataset_dir("local", "gone")
    orphan.mkdir(parents=True)
    (orphan / ck.PLAN_NAME).write_bytes(b"junk")
    (paths.dataset_dir("local", "a") / ck.PLAN_NAME).parent.mkdir(parents=True, exist_ok=True)
    (paths.dataset_dir("local", "a") / ck.PLAN_NAME).write_bytes(b"junk")
    shutil.rmtree(b)
    capsys.readouterr()
    rc, out, _ = run("doctor", "--json", capsys=capsys)
    checks = {(f["dataset"], f["check"]) for f in json.loads(out)["findings"] if f["severity"] in ("warning", "error")}
    assert rc == 1 and {("gone", "orphan"), ("a", "checkpoint"), ("b", "path")} <= checks
    rc, out, _ = run("repair", "--json", capsys=capsys)
    rep = json.loads(out)
    assert rc == 0, rep
    assert len(rep["actions"]) == 3 and not orphan.exists()
    rc, out, _ = run("list", "--json", capsys=capsys)
    b_entry = [d for d in json.loads(out)["datasets"] if d["name"] == "b"][0]
    assert not b_entry["enabled"] and "vanished" in b_entry["note"]
    assert run("remove", "--name", "b")[0] == 0
    rc, _, err = run("remove", "--name", "b", capsys=capsys)
    assert rc == 3 and "no dataset 'b'" in err


def test_console_script_and_scratchfs_group_share_the_commands(env):
    from scratchfs import cli as top

    ds = env / "ds"
    make_tree(ds, 1, 2)
    assert top.main(["keepalive", "init", "--profile", "local", "--root", str(env)]) == 0
    assert top.main(["keepalive", "add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-01-01"]) == 0
    assert main(["status", "--name", "ds"]) == 0
    proc = subprocess.run([sys.executable, "-m", "scratchfs.keepalive.cli", "refresh", "--name", "ds"],
                          capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert os.stat(ds / "dir0" / "inner" / "file1.dat").st_atime_ns > OLD_NS


def test_sigterm_stops_after_units_in_flight_and_next_run_resumes(env):
    ds = env / "ds"
    make_tree(ds, 20, 500)
    run("init", "--profile", "local", "--root", str(env))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-01-01")
    proc = subprocess.Popen([sys.executable, "-m", "scratchfs.keepalive.cli", "refresh", "--name", "ds",
                             "--unit-size", "5", "--workers", "1", "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    jour = paths.dataset_dir("local", "ds") / ck.JOURNAL_NAME
    wait_for(lambda: (jour.exists() and jour.stat().st_size > 200) or proc.poll() is not None,
             "the journal to grow", 60, interval=0.01)  # fmt: skip
    # Stopped first, so that it cannot finish between the check and the SIGTERM: the signal is
    # handled as soon as it runs again (10,000 files in units of 5: it is far from done here).
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the refresh finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 9 and "stopped by SIGTERM" in err, err
    assert ck.inspect_checkpoint(paths.dataset_dir("local", "ds")).ok
    assert main(["refresh", "--name", "ds", "--no-progress"]) == 0


def test_forecast_reports_files_on_the_site_candidate_list(env, tmp_path, capsys):
    ds = env / "ds"
    make_tree(ds, 1, 4)
    listing = tmp_path / "to_delete"
    listing.write_text(f"{ds}/dir0/inner/file0.dat\n{ds}/dir0/inner/file1.dat\n{env}/other/file\n{ds}x/not-ours\n")
    run("init", "--profile", "local", "--root", str(env), "--candidate-list", str(listing))
    run("add", "--name", "ds", "--path", str(ds), "--keep-until", "2099-12-31")
    capsys.readouterr()
    rc, out, _ = run("forecast", "--json", capsys=capsys)
    fc = json.loads(out)["datasets"][0]
    assert rc == 0 and fc["candidate_list_hits"] == 2
    assert any("2 files are on the site's purge candidate list" in w for w in fc["warnings"])
