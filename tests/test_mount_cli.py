"""Real mounts through `scratchfs mount`: lifecycle, signals, --subdir, parallel readers, and
the security properties of the mount (nosuid, nodev, default_permissions)."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.mounts import is_mounted, run_scratchfs, scratchfs_command, scratchfs_mount, unmount, wait_for

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("need_mounts")]


@pytest.fixture(scope="module")
def secure_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("sec-src")
    src.chmod(0o755)
    (src / "pub").mkdir(mode=0o755)
    (src / "pub" / "data.txt").write_bytes(b"public\n")
    secret = src / "secret.txt"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    suid = src / "suid-id"
    shutil.copy2(shutil.which("id") or "/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    os.mknod(src / "zero", 0o666 | 0o020000, os.makedev(1, 5))  # like /dev/zero
    (src / "big.txt").write_bytes(b"".join(b"%09d some text that compresses\n" % i for i in range(400_000)))
    out = tmp_path_factory.mktemp("sec-img") / "sec.sqfs"
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True)
    return out, src


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_mount_is_live_on_return_and_umount(secure_image: tuple[Path, Path], tmp_path: Path) -> None:
    img, _ = secure_image
    mp = tmp_path / "mnt"
    with scratchfs_mount(img, mp):
        # no waiting: the command returned only once the mount serves
        assert sorted(os.listdir(mp)) == ["big.txt", "pub", "secret.txt", "suid-id", "zero"]
        opts = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[1] == str(mp))
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(","))
        res = run_scratchfs("umount", str(mp))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mp)


def test_umount_of_unmounted_dir_is_one_line_error(tmp_path: Path) -> None:
    res = run_scratchfs("umount", str(tmp_path))
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "not mounted" in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(secure_image: tuple[Path, Path], tmp_path: Path, sig: int) -> None:
    img, _ = secure_image
    mp = tmp_path / "mnt"
    mp.mkdir()
    log = tmp_path / "fg.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(scratchfs_command() + ["mount", "--foreground", str(img), str(mp)], stderr=logf)
    try:
        wait_for(lambda: is_mounted(mp) or proc.poll() is not None, "the mount")
        assert proc.poll() is None, log.read_text()
        assert (mp / "pub" / "data.txt").read_bytes() == b"public\n"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not is_mounted(mp)
        assert "unmounted" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        if is_mounted(mp):
            unmount(mp)


def test_subdir(secure_image: tuple[Path, Path], tmp_path: Path) -> None:
    img, _ = secure_image
    with scratchfs_mount(img, tmp_path / "mnt", "--subdir", "pub") as m:
        assert os.listdir(m.path) == ["data.txt"]
        assert (m.path / "data.txt").read_bytes() == b"public\n"
    res = run_scratchfs("mount", str(img), str(tmp_path / "mnt"), "--subdir", "nope")
    assert res.returncode == 3 and "no such directory" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize("no_open", ["1", "0"], ids=["no-open-mode", "open-per-file"])
def test_no_open_mode_and_its_fallback_serve_the_same(
    secure_image: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_open: str
) -> None:
    """With the request hook built (it is: the package build compiles it), the mount uses the
    kernel's no-open mode and logs it; with SCRATCHFS_NO_OPEN=0 it opens per file. Both give
    the same listings and bytes, on a first and on a warm second pass."""
    from scratchfs import fusehook

    assert fusehook.loaded(), "scratchfs/_fusehook*.so is missing: the package build compiles it"
    monkeypatch.setenv(fusehook.DISABLE_ENV, no_open)
    img, src = secure_image
    with scratchfs_mount(img, tmp_path / "mnt") as m:
        for _ in range(2):
            assert sorted(os.listdir(m.path)) == ["big.txt", "pub", "secret.txt", "suid-id", "zero"]
            assert os.listdir(m.path / "pub") == ["data.txt"]
            assert (m.path / "big.txt").read_bytes() == (src / "big.txt").read_bytes()
            assert (m.path / "pub" / "data.txt").read_bytes() == b"public\n"
            with open(m.path / "big.txt", "rb") as f:
                f.seek(1_000_001)
                assert f.read(70_000) == (src / "big.txt").read_bytes()[1_000_001:1_070_001]
        log = m.log.read_text()
    said = [w for w in ("OPEN", "OPENDIR") if f"no-open mode: the kernel stops sending {w} " in log]
    assert said == (["OPEN", "OPENDIR"] if no_open == "1" else []), log


@pytest.fixture(scope="module")
def small_files_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("small-src")
    for d in range(4):
        (src / f"d{d}").mkdir()
        for i in range(100):
            (src / f"d{d}" / f"f{i:03d}").write_bytes(os.urandom(1 + (i * 977) % 9000) * (1 + i % 3))
    out = tmp_path_factory.mktemp("small-img") / "small.sqfs"
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"], check=True)
    return out, src


def _final_log(m_log: Path) -> str:
    """The mount's log once the process has logged its unmount (it does so after leaving)."""

    def done() -> str | None:
        text = m_log.read_text(errors="replace")
        return text if "unmounted " in text or "stopped serving " in text else None

    return wait_for(done, f"the unmount line in {m_log}")


@pytest.mark.parametrize("spin", ["", "0", "-1"], ids=["default", "poll-only", "off"])
def test_serial_reader_requests_are_taken_as_they_arrive(
    small_files_image: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spin: str
) -> None:
    """A serial reader (stat, then read, file after file) gets the right bytes whether the
    request loop takes requests as they arrive (fuseloop; polling /dev/fuse by default up to
    SPIN_US, or only once with 0) or always through trio's wait (-1). The mount's closing
    log line says how many were taken each way: with the default, some must have been."""
    monkeypatch.setenv("SCRATCHFS_SPIN_US", spin)
    img, src = small_files_image
    mp = tmp_path / "mnt"
    with scratchfs_mount(img, mp) as m:
        for _ in range(2):  # cold, then from the kernel's caches
            for d in sorted(os.listdir(src)):
                for name in sorted(os.listdir(src / d)):
                    want = (src / d / name).read_bytes()
                    assert os.stat(m.path / d / name).st_size == len(want)
                    assert (m.path / d / name).read_bytes() == want, f"{d}/{name}"
    log = _final_log(m.log)
    counts = [line for line in log.splitlines() if "requests taken as they arrived:" in line]
    if spin == "-1":
        assert counts == [], log
        return
    assert len(counts) == 1, log
    got = re.search(r"arrived: (\d+), after trio's wait: (\d+)", counts[0])
    assert got, counts[0]
    taken, waited = int(got[1]), int(got[2])
    assert waited > 0
    if spin == "":
        assert taken > 0, counts[0]


def test_streams_of_readahead_requests_with_the_eager_wait(tmp_path: Path) -> None:
    """Sequential readers of a large compressed file: the kernel sends several readahead
    requests at once, so a request taken at once by one loop task is often one another task
    was woken for by epoll. That task must find nothing and retry; reading /dev/fuse in
    blocking mode instead stalled the whole event loop (and the readers) for good. The hook
    makes the descriptor non-blocking: checked on the daemon's descriptor too."""
    src = tmp_path / "src"
    src.mkdir()
    data = b"".join(b"%012d a line that compresses, more or less\n" % (i * 7919 % 10**9) for i in range(1_200_000))
    (src / "big.txt").write_bytes(data)
    img = tmp_path / "big.sqfs"
    subprocess.run(["mksquashfs", str(src), str(img), "-noappend", "-quiet", "-no-progress"], check=True)
    expect = hashlib.sha256(data).hexdigest()
    with scratchfs_mount(img, tmp_path / "mnt", "--cache-size", "4M") as m:
        pid = int(m.log.read_text().split()[2])  # "date time PID LEVEL ..."
        for readers in (1, 2, 1):
            cmd = [sys.executable, "-c", "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
                   str(m.path / "big.txt")]  # fmt: skip
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(readers)]
            for p in procs:
                out, _ = p.communicate(timeout=120)
                assert out.strip() == expect
            with open(m.path / "big.txt", "rb") as f:  # the next pass asks the daemon again
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        flags = [int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"]  # fmt: skip
        assert flags and all(f & os.O_NONBLOCK for f in flags), flags


def test_parallel_readers_get_identical_bytes(secure_image: tuple[Path, Path], tmp_path: Path) -> None:
    img, src = secure_image
    expect = hashlib.sha256((src / "big.txt").read_bytes()).hexdigest()
    with scratchfs_mount(img, tmp_path / "mnt", "--cache-size", "2M") as m:

        def reader(i: int) -> str:
            h = hashlib.sha256()
            with open(m.path / "big.txt", "rb", buffering=0) as f:
                while chunk := f.read(65536 + i * 4096):
                    h.update(chunk)
            return h.hexdigest()

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(reader, range(4))) == {expect}


def test_security_nosuid_nodev_default_permissions(secure_image: tuple[Path, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the security test needs root (it mounts with allow_other and switches users)")
    pwd.getpwnam("nobody")
    img, _ = secure_image
    top = Path(tempfile.mkdtemp(prefix="scratchfs-sec-", dir="/tmp"))  # reachable by other users
    top.chmod(0o755)
    try:
        _check_security(img, top / "mnt")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _check_security(img: Path, mp: Path) -> None:
    with scratchfs_mount(img, mp, "-o", "allow_other", log=mp.with_name("log")) as m:
        # a user can read what the image's modes allow ...
        ok = as_nobody("cat", str(m.path / "pub" / "data.txt"))
        assert ok.returncode == 0 and ok.stdout == "public\n", ok.stderr
        # ... but not a 0600 file of another uid: the kernel enforces the image's modes
        denied = as_nobody("cat", str(m.path / "secret.txt"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # a setuid-root binary in the image does not run setuid
        assert os.stat(m.path / "suid-id").st_mode & 0o4000
        res = as_nobody(str(m.path / "suid-id"), "-u")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == str(pwd.getpwnam("nobody").pw_uid)
        # a device node in the image cannot be opened as a device
        assert os.stat(m.path / "zero").st_rdev == os.makedev(1, 5)
        with pytest.raises(PermissionError):
            open(m.path / "zero", "rb").close()


def test_mount_refuses_bad_arguments(secure_image: tuple[Path, Path], tmp_path: Path) -> None:
    img, _ = secure_image
    junk = tmp_path / "junk.sqfs"
    junk.write_bytes(b"\0" * 4096)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(junk), str(tmp_path / "empty")], 4, "not a squashfs image"),
        ([str(img), str(tmp_path / "full")], 2, "not empty"),
        ([str(img), str(tmp_path / "missing")], 3, "does not exist"),
        ([str(tmp_path / "nope.sqfs"), str(tmp_path / "empty")], 3, "does not exist"),
        ([str(img), str(tmp_path / "empty"), "-o", "rw"], 2, "unsupported mount option"),
    ]
    for args, code, text in cases:
        res = run_scratchfs("mount", *args)
        assert (res.returncode, res.stderr.count("\n")) == (code, 1), (args, res.stderr)
        assert text in res.stderr and "Traceback" not in res.stderr, res.stderr
    with scratchfs_mount(img, tmp_path / "empty"):
        res = run_scratchfs("mount", str(img), str(tmp_path / "empty"))
        assert res.returncode == 5 and "already a mount point" in res.stderr, res.stderr


def test_python_module_entry_point() -> None:
    res = subprocess.run([sys.executable, "-m", "scratchfs.cli", "mount", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--subdir" in res.stdout
