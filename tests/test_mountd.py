"""Real-mount tests of scratchfs-mountd: real images (mksquashfs), the real daemon started as an
admin would (it returns once the mount is live), real readers, real users (setpriv).

Slow scratch is emulated with a throttled loop device: ext4 on a loop device whose reads are
limited by the blkio cgroup controller for the daemon (see :class:`SlowScratch`).

Waits are polls of the daemon's status with a deadline (the daemon acts in real time); no test
asserts anything about timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mountd.cachestore import LOCK_NAME, STATE_NAME
from scratchfs.status_cmd import request
from scratchfs.trace import read_trace
from tests import mounts
from tests.mounts import is_mounted, unmount


def script(name: str) -> list[str]:
    p = Path(sys.executable).with_name(name)
    if p.exists():
        return [str(p)]
    mod = {"scratchfs-mountd": "mountd.main", "scratchfs": "scratchfs.cli"}[name]
    return [sys.executable, "-m", mod]


def build_image(src: Path, dest: Path) -> Path:
    """mksquashfs *src* → *dest* via a temp name and rename (as an admin would publish it)."""
    tmp = dest.with_name("." + dest.name + ".tmp")
    subprocess.run(["mksquashfs", str(src), str(tmp), "-noappend", "-quiet", "-no-progress", "-comp", "gzip"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    os.replace(tmp, dest)
    return dest


def public_dir(prefix: str) -> Path:
    """A temp directory other users can traverse (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    top.chmod(0o755)
    return top


class Mountd:
    """One scratchfs-mountd daemon under *top*: top/data, top/cache, top/mnt, top/mountd.toml."""

    def __init__(self, top: Path, *, datadir: Path | None = None, **cfg: Any) -> None:
        self.top = top
        self.data = datadir or top / "data"
        self.cache = top / "cache"
        self.mnt = top / "mnt"
        self.sock = top / "ctl.sock"
        self.log = top / "mountd.log"
        self.metrics = top / "metrics.prom"
        self.config = top / "mountd.toml"
        for d in (self.data, self.cache, self.mnt):
            d.mkdir(parents=True, exist_ok=True)
        self.cfg: dict[str, Any] = {"capacity": "1G", "reserve": 0, "window": "60s", "min_residency": 0}
        self.cfg.update(cfg)
        self.pid: int | None = None
        self.write_config()

    def write_config(self, **changes: Any) -> None:
        self.cfg.update(changes)
        lines = [f'datadir = "{self.data}"', f'cachedir = "{self.cache}"', f'mountdir = "{self.mnt}"']
        for k, v in self.cfg.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(chr(34) + x + chr(34) for x in v)}]")
            else:
                lines.append(f'{k} = "{v}"')
        self.config.write_text("\n".join(lines) + "\n")

    def command(self, *extra: str) -> list[str]:
        return script("scratchfs-mountd") + [
            "--config", str(self.config), "--socket", str(self.sock), "--log", str(self.log),
            "--metrics", str(self.metrics), "--scan-interval", "0.5", "--policy-interval", "0.5", *extra,
        ]  # fmt: skip

    def start(self, *extra: str) -> None:
        res = subprocess.run(self.command(*extra), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"scratchfs-mountd failed ({res.returncode}): {res.stderr}\n{self.log_text()}"
        assert is_mounted(self.mnt), "scratchfs-mountd returned but the mount is not live"
        self.pid = int(self.status()["pid"])

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        return dict(request(str(self.sock), {"op": "status"})["status"])

    def dataset(self, name: str) -> dict[str, Any] | None:
        return entry(self.status(), name)

    def cli(self, *args: str, user: str | None = None, groups: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = script("scratchfs") + list(args) + ["--socket", str(self.sock)]
        if user:
            ids = ["--reuid=" + user, "--regid=nogroup"]
            ids += ["--groups=" + groups] if groups else ["--clear-groups"]
            cmd = ["setpriv", *ids, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def ctl(self, action: str, name: str | None = None) -> str:
        """`scratchfs ctl ACTION NAME` (the command; see ctl_direct for the same request in-process)."""
        res = self.cli("ctl", action, *([name] if name else []))
        assert res.returncode == 0, f"ctl {action} {name}: {res.stderr}"
        return res.stdout

    def ctl_direct(self, action: str, name: str) -> str:
        """The request `scratchfs ctl` sends, from this process (no interpreter start per call)."""
        return str(request(str(self.sock), {"op": action, "name": name})["message"])

    def wait(self, pred: Callable[[dict[str, Any]], Any], what: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the status until *pred* holds (real daemon, real time: a deadline, not a sleep)."""
        last: list[dict[str, Any]] = []

        def holds() -> dict[str, Any] | None:
            last[:] = [self.status()]
            return last[0] if pred(last[0]) else None

        return mounts.wait_for(holds, what, timeout, lambda: f"; status: {last[0]}\nlog:\n{self.log_text()[-4000:]}")

    def wait_tier(self, name: str, tier: str, timeout: float = 30.0) -> dict[str, Any]:
        def ok(st: dict[str, Any]) -> bool:
            return any(d["name"] == name and d["tier"] == tier and d["copy"] is None for d in st["datasets"])

        return self.wait(ok, f"{name} on tier {tier}", timeout)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        if is_mounted(self.mnt):
            unmount(self.mnt)


def entry(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The entry of dataset *name* in a status reply (None: not served)."""
    return next((dict(d) for d in status["datasets"] if d["name"] == name), None)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@contextlib.contextmanager
def running(md: Mountd, *extra: str) -> Iterator[Mountd]:
    md.start(*extra)
    try:
        yield md
    finally:
        md.stop()


class SlowScratch:
    """A bandwidth-limited data directory: ext4 on a loop device whose reads are throttled by
    the blkio cgroup controller (v1 ``blkio.throttle.read_bps_device`` or v2 ``io.max``) for
    the processes put into the cgroup (the mountd daemon). Page-cache hits are not throttled,
    so readers drop the backing file's pages between passes.
    """

    def __init__(self, top: Path, size_mb: int = 256, bps: int = 40 << 20) -> None:
        self.top = top
        self.bps = bps
        self.file = top / "scratch.ext4"
        self.dir = top / "scratch"
        self.loop: str | None = None
        self.cgroup: Path | None = None
        self._v2 = False
        self.size_mb = size_mb

    def setup(self) -> str | None:
        """Build it; returns why it cannot be built here (None when it works)."""
        if not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
            return "mkfs.ext4/losetup missing"
        with open(self.file, "wb") as f:
            f.truncate(self.size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.file)], check=True, capture_output=True)
        res = subprocess.run(["losetup", "--find", "--show", str(self.file)], capture_output=True, text=True)
        if res.returncode != 0:
            return f"losetup: {res.stderr.strip()}"
        self.loop = res.stdout.strip()
        self.dir.mkdir(exist_ok=True)
        subprocess.run(["mount", self.loop, str(self.dir)], check=True, capture_output=True)
        self.dir.chmod(0o755)
        rdev = os.stat(self.loop).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        v1 = Path("/sys/fs/cgroup/blkio")
        v2 = Path("/sys/fs/cgroup")
        name = f"scratchfs-test-{os.getpid()}"
        try:
            if (v1 / "blkio.throttle.read_bps_device").exists():
                self.cgroup = v1 / name
                self.cgroup.mkdir()
                (self.cgroup / "blkio.throttle.read_bps_device").write_text(f"{dev} {self.bps}\n")
            elif (v2 / "cgroup.controllers").exists() and "io" in (v2 / "cgroup.controllers").read_text().split():
                self._v2 = True
                (v2 / "cgroup.subtree_control").write_text("+io")
                self.cgroup = v2 / name
                self.cgroup.mkdir()
                (self.cgroup / "io.max").write_text(f"{dev} rbps={self.bps}\n")
            else:
                return "no blkio/io cgroup controller"
        except OSError as e:
            return f"cannot set up the io throttle: {e}"
        return None

    def admit(self, pid: int) -> None:
        assert self.cgroup is not None
        (self.cgroup / "cgroup.procs").write_text(f"{pid}\n")

    def teardown(self) -> None:
        if self.cgroup is not None and self.cgroup.exists():
            parent = self.cgroup.parent
            with contextlib.suppress(OSError):
                for pid in (self.cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (parent / "cgroup.procs").write_text(pid + "\n")
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
        if self.loop:
            if is_mounted(self.dir):
                subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()


# ============================================================================== fixtures

pytestmark = pytest.mark.mount

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def top(need_mounts: None) -> Iterator[Path]:
    t = public_dir("scratchfs-mountd-")
    yield t
    if is_mounted(t / "mnt"):
        unmount(t / "mnt")
    shutil.rmtree(t, ignore_errors=True)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def cache_files(md: Mountd) -> set[str]:
    """The cache directory's files but mountd's lock, its state record and that record's
    atomic-write temp file (``.NAME.XXXX.tmp``: there for a moment each time it is written)."""
    return {n for n in os.listdir(md.cache) if n not in (STATE_NAME, LOCK_NAME) and not n.startswith(f".{STATE_NAME}.")}


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0, md: Mountd | None = None) -> Any:
    """tests.mounts.wait_for, with the daemon's status and log tail when it times out."""
    detail = (lambda: f"; status: {md.status()}\nlog:\n{md.log_text()[-5000:]}") if md else None
    return mounts.wait_for(pred, what, timeout, detail)


def drop_pages(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ============================================================================== tests

def test_reader_sees_every_byte_through_20_promotions_and_demotions(top: Path) -> None:
    """Slow scratch: ext4 on a loop device, reads throttled to 40 MiB/s by the blkio cgroup."""
    slow = SlowScratch(top)
    why = slow.setup()
    if why:
        slow.teardown()
        pytest.skip(f"slow scratch cannot be emulated here: {why}")
    try:
        data = payload(6 * MiB + 12345, 1)
        small = payload(3000, 2)
        src = make_tree(top / "src", {"data.bin": data, "dir/small.bin": small})
        img = build_image(src, slow.dir / "hot.sqfs")
        md = Mountd(top, datadir=slow.dir)
        with running(md):
            slow.admit(md.pid or 0)
            errors: list[str] = []
            passes = [0, 0]
            stop = threading.Event()

            def steady_reader() -> None:  # one open file across every switch
                try:
                    fd = os.open(md.mnt / "hot" / "data.bin", os.O_RDONLY)
                    try:
                        while not stop.is_set():
                            off = 0
                            while off < len(data):
                                chunk = os.pread(fd, 256 * KiB, off)
                                if not chunk or chunk != data[off : off + len(chunk)]:
                                    errors.append(f"steady reader: wrong bytes at {off}")
                                    return
                                off += len(chunk)
                            passes[0] += 1
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # next pass asks FUSE again
                            drop_pages(img)  # ... and the backing image's pages come from slow scratch
                    finally:
                        os.close(fd)
                except OSError as e:
                    errors.append(f"steady reader: {e!r}")

            def reopening_reader() -> None:  # opens and closes all the time
                try:
                    while not stop.is_set():
                        for rel, want in (("data.bin", data), ("dir/small.bin", small)):
                            with open(md.mnt / "hot" / rel, "rb", buffering=0) as f:
                                got = f.read()
                                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                            if got != want:
                                errors.append(f"reopening reader: wrong content of {rel}")
                                return
                        passes[1] += 1
                except OSError as e:
                    errors.append(f"reopening reader: {e!r}")

            threads = [threading.Thread(target=steady_reader), threading.Thread(target=reopening_reader)]
            for t in threads:
                t.start()
            try:
                for _ in range(20):
                    # (the policy may also promote the dataset on its own: the readers make it hot)
                    assert md.ctl_direct("prefetch", "hot") in (
                        "copying hot", "hot is cached already", "hot is being copied already")
                    md.wait_tier("hot", "cache")
                    assert md.ctl_direct("evict", "hot") == "hot demoted"
                    md.wait_tier("hot", "scratch")
                    assert not errors, errors
            finally:
                stop.set()
                for t in threads:
                    t.join(60)
            assert not errors, errors
            assert passes[0] > 0 and passes[1] > 0
            d = md.dataset("hot")
            assert d is not None
            assert d["bytes_cache"] > 0 and d["bytes_scratch"] > 0, d  # both tiers really served reads
            log = md.log_text()
            assert log.count("promoted hot:") >= 20 and log.count("demoted hot (evict)") == 20, log[-3000:]
            # every cached copy is deleted once no read uses it; nothing else appears in the cache
            wait_for(lambda: cache_files(md) == set(), "cached copies deleted", md=md)
    finally:
        slow.teardown()


def test_status_ctl_permissions_metrics_reload_and_watcher(top: Path) -> None:
    # gamma (added and removed below) is never cached: read while on scratch it could be
    # copied into spare space, and a dataset whose backing image goes away while cached is
    # meant to stay (served from the copy: test_backing_image_deleted_while_cached).
    md = Mountd(top, control_group="staff", never_cache=["gamma"])
    staff = "50"
    for name, seed in (("alpha.v1.sqfs", 1), ("alpha.v2.sqfs", 2), ("beta.squashfs", 3)):
        build_image(make_tree(top / f"src-{seed}", {"f.bin": payload(200 * KiB + seed, seed)}), md.data / name)
    with running(md):
        assert sorted(os.listdir(md.mnt)) == ["alpha.v1", "alpha.v2", "beta"]  # dots in names kept
        # status: anyone, text and JSON
        res = md.cli("status", "--json", user="nobody")
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        assert [d["name"] for d in st["datasets"]] == ["alpha.v1", "alpha.v2", "beta"]
        assert {d["tier"] for d in st["datasets"]} == {"scratch"}
        res = md.cli("status", user="nobody")
        assert res.returncode == 0 and "alpha.v2" in res.stdout and "TIER" in res.stdout, res.stderr
        # changes: refused to others, with a clear one-line error and exit code 6
        res = md.cli("ctl", "pin", "beta", user="nobody")
        assert res.returncode == 6 and res.stderr.count("\n") == 1 and "permission denied" in res.stderr, res
        assert md.dataset("beta")["pinned"] is False  # type: ignore[index]
        # ... allowed to the control group
        res = md.cli("ctl", "pin", "beta", user="nobody", groups=staff)
        assert res.returncode == 0, res.stderr
        d = md.wait_tier("beta", "cache")
        beta = next(x for x in d["datasets"] if x["name"] == "beta")
        assert beta["pinned"] is True
        assert beta["bytes_copied"] == beta["size"], beta  # one whole copy, read from scratch once
        res = md.cli("ctl", "evict", "beta")
        assert res.returncode == 2 and "pinned" in res.stderr, res
        md.ctl("unpin", "beta")
        md.ctl("evict", "beta")
        md.wait_tier("beta", "scratch")
        res = md.cli("ctl", "prefetch", "nosuch")
        assert res.returncode == 3 and "no dataset" in res.stderr, res
        # reads are counted per tier; the metrics file carries the same figures
        with open(md.mnt / "alpha.v1" / "f.bin", "rb") as f:
            assert f.read() == payload(200 * KiB + 1, 1)
        want = md.dataset("alpha.v1")
        assert want is not None and want["bytes_scratch"] >= 200 * KiB

        def metrics_agree() -> bool:
            try:
                text = md.metrics.read_text()
            except FileNotFoundError:
                return False
            line = f'scratchfs_mountd_dataset_read_bytes_total{{dataset="alpha.v1",tier="scratch"}} {want["bytes_scratch"]}'
            size = f'scratchfs_mountd_dataset_size_bytes{{dataset="beta"}} {md.dataset("beta")["size"]}'  # type: ignore[index]
            return line in text.splitlines() and size in text.splitlines()

        wait_for(metrics_agree, "metrics file with the status figures")
        # SIGHUP reloads the configuration: a newly pinned dataset is promoted
        md.write_config(pinned=["alpha.v2"])
        assert md.pid is not None
        os.kill(md.pid, signal.SIGHUP)
        md.wait_tier("alpha.v2", "cache")
        assert "configuration reloaded" in md.log_text()
        md.write_config(pinned=[])
        assert "configuration reloaded" in md.ctl("reload")
        # a bad configuration is refused on reload; the daemon keeps running with the old one
        md.write_config(window="soon")
        os.kill(md.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in md.log_text(), "the refused reload logged", md=md)
        res = md.cli("ctl", "reload")
        assert res.returncode == 2 and "window" in res.stderr and res.stderr.count("\n") == 1, res
        md.cfg.pop("window")
        md.write_config()
        assert md.dataset("alpha.v2")["pinned"] is False  # type: ignore[index]
        # new images appear, removed ones disappear, without a restart
        build_image(make_tree(top / "src-g", {"g.txt": b"gamma\n"}), md.data / "gamma.sqfs")
        wait_for(lambda: "gamma" in os.listdir(md.mnt), "gamma to appear")
        assert (md.mnt / "gamma" / "g.txt").read_bytes() == b"gamma\n"
        (md.data / "gamma.sqfs").unlink()
        wait_for(lambda: "gamma" not in os.listdir(md.mnt), "gamma to disappear", md=md)
        # two images mapping to one name: both refused, with a log line
        build_image(make_tree(top / "src-d1", {"x": b"1"}), md.data / "delta.sqfs")
        build_image(make_tree(top / "src-d2", {"x": b"2"}), md.data / "delta.squashfs")
        st = md.wait(lambda s: any(r["name"] == "delta" for r in s["refused"]), "delta refused")
        assert "delta" not in [d["name"] for d in st["datasets"]]
        assert "delta" not in os.listdir(md.mnt)
        assert "refusing dataset delta" in md.log_text()
        (md.data / "delta.squashfs").unlink()
        wait_for(lambda: "delta" in os.listdir(md.mnt), "delta to appear once the clash is gone")
        assert (md.mnt / "delta" / "x").read_bytes() == b"1"


def test_backing_image_deleted_while_cached(top: Path) -> None:
    md = Mountd(top)
    data = payload(1 * MiB + 7, 5)
    build_image(make_tree(top / "src", {"d.bin": data}), md.data / "purged.sqfs")
    trace = top / "reads.trace"
    with running(md, "--record-trace", str(trace)):
        md.ctl("prefetch", "purged")
        md.wait_tier("purged", "cache")
        with open(md.mnt / "purged" / "d.bin", "rb", buffering=0) as held:
            (md.data / "purged.sqfs").unlink()  # the scratch purge
            st = md.wait(lambda s: s["datasets"] and s["datasets"][0]["backing_gone"], "backing reported gone")
            assert st["datasets"][0]["tier"] == "cache"
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert held.read() == data
        md.wait(lambda s: s["datasets"][0]["backing_gone"], "still listed after more scans")
        assert "purged" in os.listdir(md.mnt)
        drop_pages(md.mnt / "purged" / "d.bin")
        assert (md.mnt / "purged" / "d.bin").read_bytes() == data
        res = md.cli("status")
        assert "backing image" in res.stdout and "is gone" in res.stdout, res.stdout
        served = md.dataset("purged")
    # the recorded trace replays the reads the daemon served (the simulator's input format)
    tr = read_trace(trace)
    assert tr.sizes["purged"] == served["size"]  # type: ignore[index]
    assert tr.events and {e.dataset for e in tr.events} == {"purged"}
    assert sum(e.nbytes for e in tr.events) == served["bytes_scratch"] + served["bytes_cache"]  # type: ignore[index]



def test_a_purged_dataset_with_a_kept_copy_is_served_from_it(top: Path) -> None:
    """A demoted dataset whose copy is still kept on the SSD and whose backing image is then
    purged is served from that copy (not dropped), as a cached one would be."""
    a, b = payload(3 * MiB, 51), payload(12 * MiB, 52)
    md = Mountd(top, copy_bandwidth="1M")
    img_a = build_image(make_tree(top / "src-a", {"a.bin": a}), md.data / "a.sqfs")
    img_b = build_image(make_tree(top / "src-b", {"b.bin": b}), md.data / "b.sqfs")
    md.write_config(capacity=img_a.stat().st_size + img_b.stat().st_size - 64 * KiB)  # a or b, not both
    with running(md):
        md.ctl_direct("pin", "a")
        md.wait_tier("a", "cache")
        md.ctl_direct("unpin", "a")
        md.ctl_direct("pin", "b")  # a demoted, its copy kept while b's copy (12 s) runs
        kept = md.wait(lambda s: entry(s, "a")["kept_copy"], "a's copy kept")  # type: ignore[index]
        with open(md.mnt / "a" / "a.bin", "rb", buffering=0) as held:
            img_a.unlink()  # the scratch purge
            st = md.wait(lambda s: entry(s, "a")["backing_gone"], "a's backing reported gone")  # type: ignore[index]
            d = entry(st, "a")
            assert d is not None and d["tier"] == "cache" and d["cache_file"] == entry(kept, "a")["kept_copy"], d  # type: ignore[index]
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert held.read() == a  # a file open before the purge reads on, from the copy
        assert "serving it from its kept copy" in md.log_text()
        drop_pages(md.mnt / "a" / "a.bin")
        assert (md.mnt / "a" / "a.bin").read_bytes() == a
        assert (md.mnt / "b" / "b.bin").read_bytes() == b
        # a (its only copy now) holds the space: b's copy is cancelled and what it wrote kept...
        part = md.wait(lambda s: entry(s, "b")["partial_copy"], "b's cancelled copy kept")  # type: ignore[index]
        assert Path(entry(part, "b")["partial_copy"]["file"]).exists()  # type: ignore[index]
    # ... until mountd stops: it could not be gone on from after a restart
    assert not [n for n in os.listdir(md.cache) if n.endswith(".part")], os.listdir(md.cache)
    assert (md.cache / Path(entry(kept, "a")["kept_copy"]).name).exists()  # type: ignore[index]

def test_backing_image_replaced(top: Path) -> None:
    md = Mountd(top)
    old, new = payload(1 * MiB, 6), payload(1 * MiB + 4096, 7)
    build_image(make_tree(top / "src-old", {"d.bin": old}), md.data / "ds.sqfs")
    with running(md):
        md.ctl("prefetch", "ds")
        st = md.wait_tier("ds", "cache")
        stale = Path(st["datasets"][0]["cache_file"])
        stale_ino = stale.stat().st_ino  # (the name may be reused by a later copy of the new image)

        def stale_gone() -> bool:
            try:
                return stale.stat().st_ino != stale_ino
            except FileNotFoundError:
                return True
        with open(md.mnt / "ds" / "d.bin", "rb", buffering=0) as held:
            assert held.read(100) == old[:100]
            build_image(make_tree(top / "src-new", {"d.bin": new}), md.data / "ds.sqfs")  # rename over it
            md.wait(lambda s: s["datasets"][0]["tier"] == "scratch" and s["datasets"][0]["cache_file"] is None,
                    "the new image served from scratch")  # fmt: skip

            def new_content() -> bool:
                with open(md.mnt / "ds" / "d.bin", "rb") as f:
                    return f.read() == new

            wait_for(new_content, "new content on the next open", md=md)
            # the file opened before keeps reading the image it was opened on, consistently
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            held.seek(0)
            assert held.read() == old
            assert not stale_gone()  # still in use by the open file
        wait_for(lambda: stale_gone() and f"deleted cached copy {stale}" in md.log_text(),
                 "stale cached copy deleted once unused", md=md)  # fmt: skip
        assert "backing image of ds changed" in md.log_text()


def test_restart_adopts_verified_copies_and_touches_nothing_else(top: Path) -> None:
    md = Mountd(top)
    a, b = payload(2 * MiB, 8), payload(2 * MiB, 9)
    build_image(make_tree(top / "src-a", {"a.bin": a}), md.data / "a.sqfs")
    build_image(make_tree(top / "src-b", {"b.bin": b}), md.data / "b.sqfs")
    (md.cache / "notes.txt").write_text("admin's file\n")
    (md.cache / "other.sqfs").write_bytes(b"not ours")
    with running(md):
        for n in ("a", "b"):
            md.ctl("prefetch", n)
            md.wait_tier(n, "cache")
        files = {d["name"]: Path(d["cache_file"]) for d in md.status()["datasets"]}
    # while it is down: b's copy gets damaged, a crash left a temp file behind
    with open(files["b"], "r+b") as f:
        f.seek(1 * MiB)
        byte = f.read(1)
        f.seek(1 * MiB)
        f.write(bytes([byte[0] ^ 0xFF]))
    state_path = md.cache / ".scratchfs-mountd.json"
    state = json.loads(state_path.read_text())
    state["temps"] = [".a.99999.1.part"]
    state_path.write_text(json.dumps(state))
    (md.cache / ".a.99999.1.part").write_bytes(b"partial")
    log_before = len(md.log_text())
    with running(md):
        md.wait_tier("a", "cache")
        md.wait(lambda s: entry(s, "b")["tier"] == "scratch"  # type: ignore[index]
                and not files["b"].exists(), "damaged copy of b refused and deleted")  # fmt: skip
        assert files["a"].exists()
        assert not (md.cache / ".a.99999.1.part").exists()
        assert (md.cache / "notes.txt").read_text() == "admin's file\n"
        assert (md.cache / "other.sqfs").read_bytes() == b"not ours"
        log = md.log_text()[log_before:]
        assert "adopted cached copy" in log and "copying" not in log, log
        assert "does not verify" in log
        drop_pages(md.mnt / "a" / "a.bin")
        assert (md.mnt / "a" / "a.bin").read_bytes() == a
        assert (md.mnt / "b" / "b.bin").read_bytes() == b
        assert md.dataset("a")["bytes_cache"] > 0  # type: ignore[index]


def test_config_errors_are_one_line_and_nothing_is_mounted(top: Path) -> None:
    md = Mountd(top)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"capacty": "1G"}, 2, "unknown key 'capacty'"),
        ({"window": "soon"}, 2, "window"),
        ({"copy_bandwidth": -5}, 2, "copy_bandwidth"),
    ]
    base = dict(md.cfg)
    for extra, code, text in cases:
        md.cfg = dict(base)
        md.write_config(**extra)
        res = subprocess.run(md.command(), capture_output=True, text=True, timeout=60)
        assert res.returncode == code and res.stderr.count("\n") == 1 and text in res.stderr, (extra, res.stderr)
        assert "Traceback" not in res.stderr and not is_mounted(md.mnt)
    md.cfg = dict(base)
    md.write_config()
    res = subprocess.run(md.command()[:1] + ["--config", str(top / "missing.toml")], capture_output=True, text=True)
    assert res.returncode == 3 and res.stderr.count("\n") == 1 and "not found" in res.stderr, res.stderr
    (md.mnt / "junk").write_text("x")
    res = subprocess.run(md.command(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not empty" in res.stderr and not is_mounted(md.mnt), res.stderr


def test_security_nosuid_nodev_default_permissions(top: Path) -> None:
    md = Mountd(top, allow_other=True)
    src = top / "src"
    src.mkdir()
    shutil.copy("/usr/bin/id", src / "suid-id")
    os.chown(src / "suid-id", 0, 0)
    os.chmod(src / "suid-id", 0o4755)
    (src / "secret.txt").write_text("secret\n")
    os.chown(src / "secret.txt", 1234, 1234)
    os.chmod(src / "secret.txt", 0o600)
    (src / "pub.txt").write_text("public\n")
    os.chmod(src / "pub.txt", 0o644)
    os.mknod(src / "zero", 0o666 | 0o020000, os.makedev(1, 5))
    build_image(src, md.data / "sec.sqfs")
    nobody = str(pwd.getpwnam("nobody").pw_uid)

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    with running(md):
        root = md.mnt / "sec"
        for tier in ("scratch", "cache"):  # the same on both tiers
            ok = as_nobody("cat", str(root / "pub.txt"))
            assert ok.returncode == 0 and ok.stdout == "public\n", ok.stderr
            assert (root / "secret.txt").read_text() == "secret\n"  # root may
            denied = as_nobody("cat", str(root / "secret.txt"))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
            assert os.stat(root / "suid-id").st_mode & 0o4000
            res = as_nobody(str(root / "suid-id"), "-u")
            assert res.returncode == 0 and res.stdout.strip() == nobody, res
            assert os.stat(root / "zero").st_rdev == os.makedev(1, 5)
            with pytest.raises(PermissionError):
                open(root / "zero", "rb").close()
            if tier == "scratch":
                md.ctl("prefetch", "sec")
                md.wait_tier("sec", "cache")


def test_foreground_notifies_ready_only_once_live(top: Path) -> None:
    md = Mountd(top)
    build_image(make_tree(top / "src", {"x": b"x"}), md.data / "x.sqfs")
    addr = str(top / "notify.sock")
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.bind(addr)
    recv.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=addr)
    proc = subprocess.Popen(md.command("--foreground"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = recv.recv(4096).decode()
        assert "READY=1" in msg
        assert is_mounted(md.mnt)  # live when READY arrives
        assert os.listdir(md.mnt) == ["x"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not is_mounted(md.mnt)  # SIGTERM unmounts cleanly
        assert "STOPPING=1" in recv.recv(4096).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        recv.close()


def test_failed_copy_is_cleaned_up_retried_and_scratch_keeps_serving(top: Path) -> None:
    """The image's manifest claims another checksum: every copy fails verification until fixed."""
    from scratchfs.image.manifest import describe_image, image_checksum, write_manifest

    md = Mountd(top)
    data = payload(1 * MiB, 11)
    img = build_image(make_tree(top / "src", {"d.bin": data}), md.data / "m.sqfs")
    write_manifest(img, describe_image(img, "0" * 64, time.time()))
    with running(md):
        md.ctl("prefetch", "m")
        st = md.wait(lambda s: s["datasets"][0]["copy_failures"] >= 2, "two failed copies (one retry)", 60)
        d = st["datasets"][0]
        assert d["tier"] == "scratch" and "manifest" in d["last_error"], d
        assert cache_files(md) == set()  # temp files removed
        assert (md.mnt / "m" / "d.bin").read_bytes() == data  # still served from scratch
        write_manifest(img, describe_image(img, image_checksum(img), time.time()))
        md.wait_tier("m", "cache", 60)  # the next retry succeeds
        d = md.dataset("m")
        assert d is not None and d["copy_failures"] == 0 and d["last_error"] is None
        drop_pages(md.mnt / "m" / "d.bin")
        assert (md.mnt / "m" / "d.bin").read_bytes() == data


def test_a_long_copy_gives_way_to_a_dataset_read_much_faster(top: Path) -> None:
    """The copy of a large image read once (spare space) is cancelled when a small image is
    read over and over (scratchfs.policy.gives_way); the small one is copied first, and the
    large one's copy then goes on from where it stopped (its temp file was kept).  Copies are
    limited to 1 MiB/s, so the large one takes about 24 s in all."""
    md = Mountd(top, copy_bandwidth="1M")
    big, small = payload(24 * MiB, 21), payload(2 * MiB, 22)
    build_image(make_tree(top / "src-big", {"big.bin": big}), md.data / "big.sqfs")
    build_image(make_tree(top / "src-small", {"small.bin": small}), md.data / "small.sqfs")
    with running(md):
        assert (md.mnt / "big" / "big.bin").read_bytes() == big
        md.wait(lambda s: entry(s, "big")["copy"] is not None, "big being copied")  # type: ignore[index]
        path = md.mnt / "small" / "small.bin"

        def read_small_until_big_gives_way() -> bool:
            drop_pages(path)  # so every pass reaches the daemon and counts as demand
            assert path.read_bytes() == small
            return "cancelling the copy of big" in md.log_text()

        wait_for(read_small_until_big_gives_way, "the copy of big to give way to small", md=md)
        md.wait_tier("small", "cache")
        log = md.log_text()
        after = log[log.index("cancelling the copy of big") :]
        assert "small is read faster and is copied first" in after.splitlines()[0]
        copies = [line for line in after.splitlines() if "INFO mountd.mover: copying" in line]
        assert copies and "small.sqfs" in copies[0], after  # the cancelled copy waits its turn
        part = md.dataset("big")["partial_copy"]  # type: ignore[index]
        if part is not None:  # (unless big's copy went on already)
            assert part["bytes_done"] > 0 and os.path.exists(part["file"]), part
            assert "its cancelled copy" in md.cli("status").stdout
        assert path.read_bytes() == small
        big_path = md.mnt / "big" / "big.bin"

        def read_big_until_cached() -> bool:
            drop_pages(big_path)  # read again: wanted again, so copied again
            assert big_path.read_bytes() == big
            return md.dataset("big")["tier"] == "cache"  # type: ignore[index]

        wait_for(read_big_until_cached, "big copied", timeout=60, md=md)
        log = md.log_text()
        kept = re.search(r"copy of big cancelled; the .* copied stay in (\S+) until", log)
        resumed = re.search(rf"going on with the copy of {re.escape(str(md.data / 'big.sqfs'))} at (\d+) of", log)
        assert kept and resumed and int(resumed.group(1)) > 0, log[-3000:]
        assert not os.path.exists(kept.group(1)) and md.dataset("big")["partial_copy"] is None  # type: ignore[index]
        # every copy of big after the first went on from the one before, none started from zero
        assert log.count(f"copying {md.data / 'big.sqfs'} ") == 1 + log.count("going on with the copy of"), log[-3000:]
        # ... so all its copies together read its image from scratch once, no byte twice
        d = md.dataset("big")
        assert d is not None and d["bytes_copied"] == d["size"], d
        drop_pages(big_path)
        assert big_path.read_bytes() == big


def test_a_demoted_copy_is_kept_until_its_space_is_needed(top: Path) -> None:
    """A dataset the policy demotes keeps its copy on the SSD: wanted again, it is served from
    that copy at once, with nothing copied; a copy that needs the space deletes it first, and
    our files never take more than the capacity.  Copies are limited to 1 MiB/s, so the copy of
    b (12 MiB) needs the space of a's kept copy only in its last second or so.  A copy of a
    soon after its demotion counts as a copy back."""
    a, b = payload(3 * MiB, 31), payload(12 * MiB, 32)
    md = Mountd(top, copy_bandwidth="1M")
    img_a = build_image(make_tree(top / "src-a", {"a.bin": a}), md.data / "a.sqfs")
    img_b = build_image(make_tree(top / "src-b", {"b.bin": b}), md.data / "b.sqfs")
    capacity = img_a.stat().st_size + img_b.stat().st_size - 64 * KiB  # a or b, not both
    md.write_config(capacity=capacity)

    def ds(st: dict[str, Any], name: str) -> dict[str, Any]:
        d = entry(st, name)
        assert d is not None, f"{name} is not served"
        return d

    def used() -> int:
        return sum((md.cache / n).stat().st_size for n in cache_files(md))

    with running(md):
        assert md.ctl_direct("pin", "a") == "a pinned"
        file_a = Path(ds(md.wait_tier("a", "cache"), "a")["cache_file"])
        inode = file_a.stat().st_ino
        # b pinned instead: a no longer fits and is demoted by the policy; its copy stays
        md.ctl_direct("unpin", "a")
        md.ctl_direct("pin", "b")
        st = md.wait(lambda s: ds(s, "a")["kept_copy"] is not None and ds(s, "b")["copy"] is not None, "a's copy kept, b copying")
        assert ds(st, "a")["tier"] == "scratch" and ds(st, "a")["kept_copy"] == str(file_a) and file_a.exists()
        assert st["cache"]["reclaimable"] == img_a.stat().st_size
        assert f"its copy {file_a} is kept until its space is needed" in md.cli("status").stdout
        assert (md.mnt / "a" / "a.bin").read_bytes() == a
        # a wanted again before b's copy needs its space: served from the kept copy, not copied
        md.ctl_direct("unpin", "b")
        md.ctl_direct("pin", "a")
        st = md.wait_tier("a", "cache")
        assert ds(st, "a")["cache_file"] == str(file_a) and file_a.stat().st_ino == inode
        log = md.log_text()
        assert "promoting a again from its kept copy" in log
        assert log.count(f"copying {img_a} ") == 1, log[-3000:]  # copied once, at the start
        assert (md.mnt / "a" / "a.bin").read_bytes() == a
        md.wait(lambda s: ds(s, "b")["copy"] is None, "b's copy cancelled (a and b do not fit)")
        # b again: a is demoted and kept again, and deleted when b's copy needs the space
        md.ctl_direct("unpin", "a")
        md.ctl_direct("pin", "b")
        biggest = 0

        def b_cached() -> bool:
            nonlocal biggest
            biggest = max(biggest, used())
            return ds(md.status(), "b")["tier"] == "cache"

        wait_for(b_cached, "b copied", timeout=60, md=md)
        assert f"deleted the kept copy of a ({file_a}): its space is needed" in md.log_text()
        assert not file_a.exists() and ds(md.status(), "a")["kept_copy"] is None
        assert biggest <= capacity and used() <= capacity, (biggest, used(), capacity)
        assert (md.mnt / "a" / "a.bin").read_bytes() == a and (md.mnt / "b" / "b.bin").read_bytes() == b
        # a wanted again, its kept copy gone: copied back soon after the policy demoted it, which
        # status counts (a policy input); being served from the kept copy was not a copy back
        assert ds(md.status(), "a")["copied_back"] == 0
        md.ctl_direct("unpin", "b")
        md.ctl_direct("pin", "a")
        st = md.wait_tier("a", "cache", timeout=60)
        assert ds(st, "a")["copied_back"] == 1 and ds(st, "b")["copied_back"] == 0
        line = 'scratchfs_mountd_dataset_copied_back_total{dataset="a"} 1'
        wait_for(lambda: md.metrics.exists() and line in md.metrics.read_text().splitlines(), "copy back in the metrics", md=md)


def test_kept_copies_go_first_when_the_disk_fills_up(top: Path) -> None:
    """The cache directory is a 16 MiB tmpfs.  Once something else fills it past the reserve,
    the next policy round deletes the kept copy (ours), and nothing else."""
    md = Mountd(top, copy_bandwidth="1M", reserve="1M")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(md.cache)], check=True)
    try:
        img_a = build_image(make_tree(top / "src-a", {"a.bin": payload(4 * MiB, 41)}), md.data / "a.sqfs")
        img_b = build_image(make_tree(top / "src-b", {"b.bin": payload(4 * MiB, 42)}), md.data / "b.sqfs")
        md.write_config(capacity=img_a.stat().st_size + img_b.stat().st_size - 64 * KiB)  # a or b, not both
        with running(md):
            md.ctl_direct("pin", "a")
            md.wait_tier("a", "cache")
            md.ctl_direct("unpin", "a")
            md.ctl_direct("pin", "b")  # a demoted, its copy kept
            md.wait(lambda s: entry(s, "a")["kept_copy"], "a's copy kept")  # type: ignore[index]
            md.ctl_direct("unpin", "b")
            assert md.ctl_direct("evict", "b") in ("copy of b cancelled", "b demoted")  # no copy running now
            # (the cancelled copy's temp file, or b's copy, goes a moment later)
            wait_for(lambda: cache_files(md) == {"a.sqfs"}, "only a's kept copy in the cache", md=md)
            filler = md.cache / "admins-file"
            with open(filler, "wb") as f:  # fill the disk: the reserve is gone
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * MiB)
                        f.flush()
            size = filler.stat().st_size
            wait_for(lambda: "deleted the kept copy of a" in md.log_text(), "the kept copy deleted", md=md)
            assert cache_files(md) == {"admins-file"} and filler.stat().st_size == size
            assert md.dataset("a")["kept_copy"] is None  # type: ignore[index]
    finally:
        md.stop()
        unmount(md.cache)
