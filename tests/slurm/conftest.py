"""Session fixture: a real single-node Slurm (see harness.py) and an unprivileged test user.

When Slurm cannot be installed or started, every test using it FAILS with the reason; nothing
is skipped. User-facing commands run as the test user (``runuser``) with its own XDG dirs and
the project's code on a Python that user can execute.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import Cluster, HarnessError  # noqa: E402

from tests import mounts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _report(config: pytest.Config, msg: str) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    tr = config.pluginmanager.getplugin("terminalreporter")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        if tr is not None:
            tr.write_line(f"[slurm fixture] {msg}")
        else:
            print(f"[slurm fixture] {msg}", file=sys.__stderr__)


def _user_python(cluster: Cluster) -> str:
    """A Python the test user can run that imports this checkout's scratchfs.

    The project's venv interpreter may live where the test user cannot reach (e.g. under a
    mode-700 /root); then a venv of the system Python of the same minor version is made that
    adds the project's site-packages (which hold the editable install) with site.addsitedir.
    """
    probe = ["-c", "import scratchfs.cli, scratchfs.jobs, scratchfs.keepalive.cli"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    if cluster.run_as_user([sys.executable, *probe], env).returncode == 0:
        return sys.executable
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = shutil.which(f"python{ver}", path="/usr/local/bin:/usr/bin:/bin")
    if base is None:
        raise HarnessError(f"the test user cannot run {sys.executable} and no system python{ver} exists")
    venv = cluster.run_dir / "user-venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    purelib = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    vsite = next((venv / "lib").glob("python*/site-packages"))
    (vsite / "scratchfs-project.pth").write_text(
        f"import site; site.addsitedir({purelib!r}); site.addsitedir({platlib!r})\n")
    for p in [venv, *venv.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o055)
    py = str(venv / "bin" / "python")
    r = cluster.run_as_user([py, *probe], env)
    if r.returncode != 0:
        raise HarnessError(f"the test user cannot import scratchfs with {py}: {r.stderr.strip()[-300:]}")
    return py


@pytest.fixture(scope="session")
def slurm_cluster(pytestconfig: pytest.Config) -> Iterator[Cluster]:
    cluster = Cluster()
    t0 = time.monotonic()
    try:
        cluster.start()
    except (HarnessError, OSError, subprocess.SubprocessError) as e:
        try:
            cluster.stop()
        finally:
            pytest.fail(f"Slurm could not be started: {e}", pytrace=False)
    _report(pytestconfig, f"started in {time.monotonic() - t0:.1f}s: {cluster.timings}")
    try:
        yield cluster
    finally:
        t1 = time.monotonic()
        cluster.stop()
        _report(pytestconfig, f"stopped in {time.monotonic() - t1:.1f}s")


@dataclass
class UserSession:
    """The test user with fresh XDG dirs and a scratch root, and helpers to run our CLIs as them."""

    cluster: Cluster
    python: str
    root: Path  # per-test directory in the user's home
    env: dict[str, str]

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def state_home(self) -> Path:
        return Path(self.env["XDG_STATE_HOME"])

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cluster.run_as_user(list(cmd), self.env, timeout=timeout)

    def ka(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "scratchfs.keepalive.cli", *args)

    def sfs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "scratchfs.cli", *args)

    def ok(self, p: subprocess.CompletedProcess[str]) -> str:
        assert p.returncode == 0, f"{p.args[-6:]} exited {p.returncode}: {p.stderr.strip()[-800:]} {p.stdout[-400:]}"
        return p.stdout

    def mkdir(self, rel: str) -> Path:
        d = self.root / rel
        d.mkdir(parents=True, exist_ok=True)
        _chown_tree(self.root, self.cluster.user)
        return d

    def make_tree(self, rel: str, n_files: int, old_atime: float | None = None) -> Path:
        """A tree of small files owned by the user (atime set back when *old_atime* is given)."""
        d = self.root / rel
        for i in range(n_files):
            sub = d / f"d{i // 200:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            f = sub / f"f{i:05d}.dat"
            f.write_bytes(b"x" * 16)
            if old_atime is not None:
                st = f.stat()
                os.utime(f, ns=(int(old_atime * 1e9), st.st_mtime_ns))
        _chown_tree(self.root, self.cluster.user)
        return d

    def queue(self, name: str) -> list[tuple[str, str]]:
        """(job id, state) of the user's jobs called *name* (squeue with an explicit format)."""
        p = subprocess.run(["squeue", "-h", "-r", "-u", self.cluster.user, "-o", "%i|%T|%j"],
                           capture_output=True, text=True, check=True)
        out = []
        for line in p.stdout.splitlines():
            jid, state, jname = line.split("|", 2)
            if jname == name:
                out.append((jid, state))
        return out

    def scrontab_text(self) -> str:
        p = self.run("scrontab", "-l")
        return p.stdout if p.returncode == 0 else ""


def _chown_tree(root: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for n in filenames:
            os.chown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)


@pytest.fixture(scope="session")
def user_python(slurm_cluster: Cluster) -> str:
    try:
        return _user_python(slurm_cluster)
    except (HarnessError, subprocess.SubprocessError, OSError) as e:
        pytest.fail(f"cannot run scratchfs as the test user: {e}", pytrace=False)


@pytest.fixture
def user(slurm_cluster: Cluster, user_python: str) -> Iterator[UserSession]:
    pw = slurm_cluster.ensure_user()
    root = Path(tempfile.mkdtemp(prefix=f"t-{uuid.uuid4().hex[:6]}-", dir=pw.pw_dir))
    for sub in ("config", "state", "data", "cache", "scratch"):
        (root / sub).mkdir()
    _chown_tree(root, slurm_cluster.user)
    env = slurm_cluster.user_env(root)
    sess = UserSession(slurm_cluster, user_python, root, env)
    # a clean slate for each test: no scrontab, no queued jobs of the user
    sess.run("scrontab", "-r")
    subprocess.run(["scancel", "-u", slurm_cluster.user], capture_output=True)
    yield sess
    sess.run("scrontab", "-r")
    subprocess.run(["scancel", "-u", slurm_cluster.user], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 1.0) -> object:
    """Poll *cond* until it returns something truthy; fail with *what* after *timeout* seconds
    (tests.mounts.wait_for, polling once a second: Slurm acts on its own schedule)."""
    last: list[object] = [None]

    def probe() -> object:
        last[0] = cond()
        return last[0]

    return mounts.wait_for(probe, what, timeout, detail=lambda: f" after {timeout:.0f}s (last: {last[0]!r})",
                           interval=interval)  # fmt: skip
