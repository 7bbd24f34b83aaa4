#!/usr/bin/env python3
"""A real single-node Slurm on 127.0.0.1 for tests and demos.

    python tests/slurm/harness.py install   # apt packages; scrontab built from Debian's source
    python tests/slurm/harness.py start     # munged, slurmctld, slurmd; test user; prints timings
    python tests/slurm/harness.py status [--json]
    python tests/slurm/harness.py stop      # cancels jobs, stops every daemon it started, by PID

Needs root on Debian 12 (slurmctld, slurmd, slurm-client, munge 22.05). Debian's slurm-client
lacks ``scrontab``; ``install`` builds it from Debian's source package of the same version
(configure, then compile only ``src/scrontab`` against the installed libslurmfull) into
/usr/local/bin. The cluster's slurm.conf is written to /etc/slurm/slurm.conf with a marker
line; a slurm.conf without the marker (a real cluster's) is never touched.

There is no systemd here: daemons run in the foreground (``-D``) as children started in
their own session, their PIDs are kept in ``<run dir>/pids.json`` and ``stop`` ends exactly
those (and the job step daemons the slurmd started), nothing found by name.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# written by scratchfs tests/slurm/harness.py"
SLURM_CONF = Path(os.environ.get("SCRATCHFS_SLURM_CONF_PATH", "/etc/slurm/slurm.conf"))
RUN_DIR = Path(os.environ.get("SCRATCHFS_SLURM_DIR", "/var/tmp/scratchfs-slurm"))
TEST_USER = os.environ.get("SCRATCHFS_SLURM_USER", "scratchfs-slurm-test")
SCRONTAB_DEST = Path("/usr/local/bin/scrontab")
APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "cron"]
# what building scrontab from the source package needs
BUILD_PACKAGES = ["gcc", "make", "binutils", "dpkg-dev", "xz-utils", "libc6-dev"]
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/scratchfs-deb-src.sources")
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


class HarnessError(Exception):
    """Slurm could not be installed or started; the message says why."""


def _say(msg: str) -> None:
    print(f"[slurm-harness] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, check: bool = True, env: dict[str, str] | None = None,
         cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise HarnessError(f"{' '.join(cmd)} failed ({p.returncode}): {' | '.join(tail)}")
    return p


# ----------------------------------------------------------------------------- install

def _missing_packages(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "ok installed" not in p.stdout:
            missing.append(name)
    return missing


def _apt_install(names: list[str]) -> None:
    missing = _missing_packages(names)
    if not missing:
        return
    _say(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def _enable_deb_src() -> bool:
    """Add deb-src entries mirroring the deb ones (idempotent). True when the file changed."""
    if DEB_SRC_FILE.exists():
        return False
    entries = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]:
        if not src.exists() or src == DEB_SRC_FILE:
            continue
        text = src.read_text()
        if src.suffix == ".sources":
            for stanza in text.split("\n\n"):
                lines = [ln for ln in stanza.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
                fields = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lines if ":" in ln}
                if "deb" in fields.get("Types", "").split() and "debian" in fields.get("URIs", ""):
                    lines = [("Types: deb-src" if ln.startswith("Types:") else ln) for ln in lines]
                    entries.append("\n".join(lines))
        else:
            for ln in text.splitlines():
                if ln.startswith("deb ") and "debian" in ln:
                    entries.append("Types: deb-src\n" + _one_line_to_deb822(ln))
    if not entries:
        raise HarnessError("no Debian apt source found to derive deb-src entries from")
    DEB_SRC_FILE.write_text(MARKER + "\n" + "\n\n".join(entries) + "\n")
    return True


def _one_line_to_deb822(line: str) -> str:
    parts = line.split()[1:]
    opts = ""
    if parts and parts[0].startswith("["):
        opts = parts.pop(0).strip("[]")
    uri, suite, comps = parts[0], parts[1], parts[2:]
    out = f"URIs: {uri}\nSuites: {suite}\nComponents: {' '.join(comps)}"
    if opts.startswith("signed-by="):
        out += f"\nSigned-By: {opts.split('=', 1)[1]}"
    return out


def build_scrontab(workdir: Path = Path("/var/tmp/scratchfs-scrontab-build")) -> Path:
    """Build scrontab from Debian's source package of the installed Slurm version."""
    _apt_install(BUILD_PACKAGES)
    version = _run(["dpkg-query", "-W", "-f=${Version}", "slurm-client"]).stdout.strip()
    source = _run(["dpkg-query", "-W", "-f=${source:Package}", "slurm-client"]).stdout.strip() or "slurm-wlm"
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    if _enable_deb_src():
        _run(["apt-get", "update", "-qq"])
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    _say(f"fetching source {source}={version}")
    _run(["apt-get", "source", "--download-only", "-qq", f"{source}={version}"], cwd=workdir)
    dsc = next(workdir.glob("*.dsc"))
    _run(["dpkg-source", "--no-check", "-x", dsc.name, "src"], cwd=workdir)
    tree = workdir / "src"
    _say(f"configuring slurm {upstream} (only to get config.h)")
    _run(["./configure", "-q", "--sysconfdir=/etc/slurm", "--disable-debug", "--without-rpath"], cwd=tree)
    d = tree / "src" / "scrontab"
    objs = []
    for txt in ("default_crontab", "usage"):
        _run(["ld", "-r", "-o", f"{txt}.bino", "-z", "noexecstack", "--format=binary", f"{txt}.txt"], cwd=d)
        _run(["objcopy", "--rename-section", ".data=.rodata,alloc,load,readonly,data,contents", f"{txt}.bino"], cwd=d)
        objs.append(f"{txt}.bino")
    libdir = _slurm_libdir()
    _run(["gcc", "-O2", "-DHAVE_CONFIG_H", "-I../..", "-I../../slurm", "-o", "scrontab",
          "env.c", "opt.c", "parse.c", "scrontab.c", *objs, f"-L{libdir}", "-lslurmfull",
          f"-Wl,-rpath,{libdir}", "-ldl", "-lpthread"], cwd=d)
    shutil.copy2(d / "scrontab", SCRONTAB_DEST)
    SCRONTAB_DEST.chmod(0o755)
    shutil.rmtree(workdir, ignore_errors=True)
    return SCRONTAB_DEST


def _slurm_libdir() -> Path:
    for cand in Path("/usr/lib").glob("*/slurm-wlm/libslurmfull.so"):
        return cand.parent
    raise HarnessError("libslurmfull.so not found: is slurm-client installed?")


def install() -> dict[str, float]:
    t0 = time.monotonic()
    _apt_install(APT_PACKAGES)
    t1 = time.monotonic()
    if not shutil.which("scrontab", path=USER_PATH):
        build_scrontab()
    t2 = time.monotonic()
    return {"apt_s": round(t1 - t0, 1), "scrontab_build_s": round(t2 - t1, 1)}


# ----------------------------------------------------------------------------- config

def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(256, int(line.split()[1]) // 1024 - 512)
    return 1024


def slurm_conf(host: str, run_dir: Path) -> str:
    # CPUs is deliberately larger than the machine (config_overrides) so several one-CPU test
    # jobs (watchers, chains, tracked jobs) can run at once on a 2-core box.
    return f"""{MARKER}
ClusterName=scratchfs-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={run_dir}/ctld
SlurmdSpoolDir={run_dir}/slurmd
SlurmctldPidFile={run_dir}/slurmctld.pid
SlurmdPidFile={run_dir}/slurmd.pid
SlurmctldLogFile={run_dir}/log/slurmctld.log
SlurmdLogFile={run_dir}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ScronParameters=enable
ReturnToService=2
MinJobAge=60
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


# ----------------------------------------------------------------------------- daemons

@dataclass
class Cluster:
    run_dir: Path = RUN_DIR
    user: str = TEST_USER
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # daemons started by this process, reaped in stop()
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pids.json"

    def load(self) -> Cluster:
        try:
            d = json.loads(self.pid_file.read_text())
            self.pids = {k: int(v) for k, v in d.get("pids", {}).items()}
            self.timings = d.get("timings", {})
        except (OSError, ValueError):
            pass
        return self

    def save(self) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pids": self.pids, "timings": self.timings, "user": self.user}, indent=2))
        os.replace(tmp, self.pid_file)

    # ---- start
    def start(self) -> Cluster:
        if os.geteuid() != 0:
            raise HarnessError("the Slurm harness needs root (it starts munged, slurmctld and slurmd)")
        t0 = time.monotonic()
        installed = install()
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
            raise HarnessError(f"{SLURM_CONF} exists and was not written by this harness; refusing to replace it")
        self.load()
        self.timings = dict(installed)
        if any(_alive(p) for p in self.pids.values()):
            _say("stopping a previous harness cluster first")
            self.stop()
        host = socket.gethostname().split(".")[0]
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for sub in ("ctld", "slurmd", "log"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)
        (self.run_dir / "log").chmod(0o755)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(slurm_conf(host, self.run_dir))
        self.pids = {}
        t1 = time.monotonic()
        self._start_munge()
        self.pids["slurmctld"] = self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: _run(["scontrol", "ping"], check=False).stdout.find("UP") >= 0, 60,
                   "slurmctld did not answer scontrol ping", "slurmctld")
        self.pids["slurmd"] = self._spawn("slurmd", ["slurmd", "-D"])
        self._wait(lambda: _node_state() in ("idle", "mixed", "allocated"), 90,
                   "node did not become idle", "slurmd")
        self.save()
        self.ensure_user()
        self.timings["start_s"] = round(time.monotonic() - t1, 1)
        self.timings["setup_total_s"] = round(time.monotonic() - t0, 1)
        self.save()
        return self

    def _start_munge(self) -> None:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create", "--keyfile", str(key)])
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        if _run(["munge", "-n"], check=False).returncode == 0:
            _say("munged already running; using it")
            return
        self.pids["munged"] = self._spawn(
            "munged", ["/usr/sbin/munged", "--foreground", "--force"], user="munge")
        self._wait(lambda: _run(["munge", "-n"], check=False).returncode == 0, 30, "munged did not start", "munged")

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> int:
        log = open(self.run_dir / "log" / f"{name}.out", "ab")
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, user=user, group=user,
                                 extra_groups=[] if user else None)
        finally:
            log.close()
        self.pids[name] = p.pid
        self.procs[name] = p
        self.save()
        return p.pid

    def _wait(self, ok: object, timeout: float, what: str, daemon: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(ok) and ok():
                return
            pid = self.pids.get(daemon)
            if pid and not _alive(pid):
                break
            time.sleep(0.3)
        logs = ""
        for f in (self.run_dir / "log").glob(f"{daemon}*"):
            logs += f"\n--- {f}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
        raise HarnessError(f"{what} within {timeout:.0f}s{logs}")

    def ensure_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            _run(["useradd", "-m", "-s", "/bin/bash", self.user])
            return pwd.getpwnam(self.user)

    # ---- stop
    def stop(self) -> float:
        t0 = time.monotonic()
        self.load()
        ctld_up = self.pids.get("slurmctld") and _alive(self.pids["slurmctld"])
        if ctld_up:
            # remove everything the tests queued (cron entries included) so no job outlives us
            p = _run(["squeue", "-h", "-o", "%i"], check=False)
            ids = [j for j in p.stdout.split() if j]
            if ids:
                _run(["scancel", "--full", *sorted({j.split("_")[0] for j in ids})], check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and _run(["squeue", "-h", "-t", "R,CG", "-o", "%i"],
                                                           check=False).stdout.strip():
                    time.sleep(0.5)
        stepd = _children_named("slurmstepd", since_pid=self.pids.get("slurmd"))
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid:
                _terminate(pid)
        for pid in stepd:
            _terminate(pid, grace=5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs = {}
        self.pids = {}
        self.timings["stop_s"] = round(time.monotonic() - t0, 1)
        if self.run_dir.exists():
            self.save()
        return self.timings["stop_s"]

    # ---- status
    def status(self) -> dict[str, object]:
        self.load()
        return {
            "run_dir": str(self.run_dir),
            "user": self.user,
            "daemons": {k: {"pid": v, "alive": _alive(v)} for k, v in self.pids.items()},
            "node_state": _node_state() if shutil.which("sinfo") else None,
            "scrontab": shutil.which("scrontab", path=USER_PATH),
            "timings": self.timings,
        }

    # ---- running things as the test user
    def user_env(self, xdg_root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        pw = pwd.getpwnam(self.user)
        env = {
            "HOME": pw.pw_dir, "USER": self.user, "LOGNAME": self.user, "PATH": USER_PATH,
            "LANG": "C.UTF-8", "SHELL": "/bin/bash",
            "XDG_CONFIG_HOME": str(xdg_root / "config"), "XDG_STATE_HOME": str(xdg_root / "state"),
            "XDG_DATA_HOME": str(xdg_root / "data"), "XDG_CACHE_HOME": str(xdg_root / "cache"),
        }
        env.update(extra or {})
        return env

    def run_as_user(self, cmd: list[str], env: dict[str, str], *, check: bool = False,
                    timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        full = ["runuser", "-u", self.user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd]
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=check, input=input,
                              cwd="/")


def _node_state() -> str:
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return p.stdout.strip().split("\n")[0].rstrip("*~#") if p.returncode == 0 else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _children_named(name: str, since_pid: int | None) -> list[int]:
    """PIDs of processes called *name* started after process *since_pid* (our slurmd's job steps)."""
    if not since_pid:
        return []
    try:
        start = int(Path(f"/proc/{since_pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return []
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != name:
                continue
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[19]) >= start:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("action", choices=["install", "start", "stop", "status"])
    ap.add_argument("--json", action="store_true", help="status as JSON")
    a = ap.parse_args(argv)
    cluster = Cluster()
    try:
        if a.action == "install":
            print(json.dumps(install()))
        elif a.action == "start":
            cluster.start()
            print(f"slurm up: {json.dumps(cluster.timings)}")
        elif a.action == "stop":
            print(f"slurm stopped in {cluster.stop():.1f}s")
        else:
            st = cluster.status()
            if a.json:
                print(json.dumps(st, indent=2))
            else:
                for k, v in st.items():
                    print(f"{k}: {v}")
    except HarnessError as e:
        print(f"slurm harness: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
