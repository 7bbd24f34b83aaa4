"""tools/throttlefs.py, the slow-scratch emulator of bench_mountd: its link arithmetic (pure,
injected times) and a real mount serving the source's bytes read-only. No timing asserted."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounts import is_mounted, unmount, wait_for

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import throttlefs  # noqa: E402


def test_link_serves_requests_first_come_first_served() -> None:
    link = throttlefs.Link(rate=1000.0, latency=0.5)
    assert link.book(10.0, 1000) == 11.5  # 1 s on the link + latency
    assert link.book(10.2, 500) == 12.0  # queued behind the first: starts at 11.0
    assert link.book(20.0, 100) == 20.6  # link idle again: starts on arrival
    assert link.free_at == 20.1


def test_unlimited_link_adds_only_latency() -> None:
    link = throttlefs.Link(rate=0.0, latency=0.25)
    assert link.book(5.0, 10**9) == 5.25
    assert link.book(5.0, 10**9) == 5.25


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_mount_passes_bytes_through_read_only(tmp_path: Path) -> None:
    src, mnt, rate = tmp_path / "src", tmp_path / "mnt", tmp_path / "rate"
    (src / "sub").mkdir(parents=True)
    mnt.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (src / "sub" / "f.bin").write_bytes(data)
    (src / "link").symlink_to("sub/f.bin")
    rate.write_text(str(64 * 1024 * 1024))
    log = tmp_path / "log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, str(TOOLS / "throttlefs.py"), str(src), str(mnt), "--rate-file", str(rate)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, "throttlefs to mount")
        assert is_mounted(mnt), log.read_text()
        assert sorted(os.listdir(mnt)) == ["link", "sub"]
        assert (mnt / "sub" / "f.bin").read_bytes() == data
        assert os.readlink(mnt / "link") == "sub/f.bin"
        assert os.stat(mnt / "sub" / "f.bin").st_size == len(data)
        with pytest.raises(OSError) as e:
            (mnt / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        rate.write_text("0")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "rate now 0 bytes/s" in log.read_text(), "throttlefs to take the new rate")
    finally:
        if is_mounted(mnt):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_mounted(mnt)
    assert (src / "sub" / "f.bin").read_bytes() == data  # the source is untouched
