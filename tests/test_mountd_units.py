"""mountd's parts without a mount: name mapping, metrics text, the cache record, peer checks,
systemd notification, and the copier on real files (real squashfs images where it matters)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from mountd.cachestore import CachedCopy, CacheStore
from mountd.control import Peer, is_privileged
from mountd.notify import notify
from mountd.watcher import dataset_name, map_names
from scratchfs import metrics
from scratchfs.copier import (
    PACED_READ_MIN,
    READ_SIZE,
    CopyCancelled,
    CopyError,
    Identity,
    Partial,
    Progress,
    Throttle,
    Writeback,
    copy_image,
    read_size,
    verify_copy,
)
from scratchfs.image.manifest import describe_image, image_checksum, write_manifest
from scratchfs.status_cmd import format_status
from tests.mounts import wait_for


def test_dataset_names_keep_dots_and_clashes_are_refused() -> None:
    assert dataset_name("imagenet.v1.sqfs") == "imagenet.v1"
    assert dataset_name("imagenet.v2.squashfs") == "imagenet.v2"
    assert dataset_name(".imagenet.sqfs.tmp") is None and dataset_name(".hidden.sqfs") is None
    assert dataset_name("notes.txt") is None and dataset_name(".sqfs") is None
    found, clashes = map_names([Path("/a/x.sqfs"), Path("/b/x.squashfs"), Path("/a/y.v1.sqfs"), Path("/b/y.v2.sqfs"),
                                Path("/b/z.sqfs"), Path("/c/z.sqfs")])  # fmt: skip
    assert found == {"y.v1": Path("/a/y.v1.sqfs"), "y.v2": Path("/b/y.v2.sqfs")}
    assert clashes == {"x": [Path("/a/x.sqfs"), Path("/b/x.squashfs")], "z": [Path("/b/z.sqfs"), Path("/c/z.sqfs")]}


STATUS = {
    "mountdir": "/mnt/data",
    "cachedir": "/ssd",
    "cache": {"capacity": 1000, "free": 500, "budget": 900, "used": 300, "reclaimable": 150},
    "datasets": [
        {"name": 'we"ird\\name', "tier": "cache", "size": 300, "rate": 12.5, "bytes_scratch": 10, "bytes_cache": 30,
         "partial_copy": {"file": "/ssd/.x.1.part", "bytes_done": 120},
         "hit_ratio": 0.75, "pinned": True, "backing_gone": True, "backing": "/scratch/x.sqfs",
         "last_promotion": 1700000000.0, "last_demotion": None, "copy": None, "copy_failures": 0, "last_error": None},
        {"name": "b", "tier": "scratch", "size": 200, "rate": 0.0, "bytes_scratch": 0, "bytes_cache": 0, "bytes_copied": 250, "copied_back": 3,
         "hit_ratio": None, "pinned": False, "backing_gone": False, "backing": "/scratch/b.sqfs",
         "kept_copy": "/ssd/b.sqfs", "last_promotion": None, "last_demotion": None, "copy_failures": 2, "last_error": "boom",
         "copy": {"phase": "copying", "bytes_done": 50, "bytes_total": 200, "fraction": 0.25, "rate": 1.0}},
    ],
    "refused": [{"name": "c", "images": ["/s/c.sqfs", "/t/c.sqfs"]}],
}  # fmt: skip


def test_metrics_text_carries_the_status_figures() -> None:
    text = metrics.render(STATUS)
    lines = set(text.splitlines())
    esc = 'we\\"ird\\\\name'
    assert f'scratchfs_mountd_dataset_read_bytes_total{{dataset="{esc}",tier="cache"}} 30' in lines
    assert f'scratchfs_mountd_dataset_read_bytes_total{{dataset="{esc}",tier="scratch"}} 10' in lines
    assert f'scratchfs_mountd_dataset_hit_ratio{{dataset="{esc}"}} 0.75' in lines
    assert f'scratchfs_mountd_dataset_backing_present{{dataset="{esc}"}} 0' in lines
    assert f'scratchfs_mountd_dataset_cached{{dataset="{esc}"}} 1' in lines
    assert 'scratchfs_mountd_dataset_copy_ratio{dataset="b"} 0.25' in lines
    assert 'scratchfs_mountd_dataset_copy_failures_total{dataset="b"} 2' in lines
    assert 'scratchfs_mountd_dataset_copied_bytes_total{dataset="b"} 250' in lines
    assert 'scratchfs_mountd_dataset_copied_back_total{dataset="b"} 3' in lines
    assert not any(line.startswith("scratchfs_mountd_dataset_hit_ratio{dataset=\"b\"}") for line in lines)
    assert "scratchfs_mountd_cache_budget_bytes 900" in lines
    assert "scratchfs_mountd_cache_reclaimable_bytes 150" in lines
    # every sample line is NAME{labels} VALUE, every metric has HELP and TYPE
    names = {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}
    for n in names:
        assert f"# TYPE {n} gauge" in lines or f"# TYPE {n} counter" in lines


def test_status_text_says_backing_gone_failures_and_refusals() -> None:
    out = format_status(STATUS)
    assert "backing image /scratch/x.sqfs is gone" in out
    assert "last copy failed (2x): boom" in out
    assert "c: refused" in out and "copying 25%" in out
    assert "b: its copy /ssd/b.sqfs is kept until its space is needed" in out and "150 B kept reclaimable" in out
    assert "its cancelled copy /ssd/.x.1.part (120 B of 300 B) is kept until its space is needed" in out
    head, row = out.splitlines()[1], out.splitlines()[3]
    assert row.startswith("b ") and row[head.index("COPIED") :].startswith("250 B"), out  # what its copies read


def _ident(n: int = 1) -> Identity:
    return Identity(n, n, "00" * 96)


def test_cache_store_deletes_only_its_own_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.sqfs").write_bytes(b"admin's")
    store = CacheStore(tmp_path)
    store.load()
    assert store.final_path("a") == tmp_path / "a~1.sqfs"  # never over an existing file
    tmp = store.new_temp("a")
    tmp.write_bytes(b"partial")
    store.add(CachedCopy("a~1.sqfs", "a", "/s/a.sqfs", _ident(), "ab" * 32, 1.0))
    (tmp_path / "a~1.sqfs").write_bytes(b"copy")
    store.save()
    assert not store.delete("a.sqfs")  # not ours
    assert (tmp_path / "a.sqfs").read_bytes() == b"admin's"
    again = CacheStore(tmp_path)
    again.load()
    assert set(again.copies) == {"a~1.sqfs"} and again.copies["a~1.sqfs"].identity == _ident()
    assert again.remove_temps() == 1 and not tmp.exists()
    assert again.delete("a~1.sqfs") and not (tmp_path / "a~1.sqfs").exists()
    assert (tmp_path / "a.sqfs").exists()
    # an unreadable record is a warning and a fresh start (deleting nothing)
    (tmp_path / ".scratchfs-mountd.json").write_text("{not json")
    broken = CacheStore(tmp_path)
    broken.load()
    assert broken.copies == {} and "unreadable" in caplog.text


def test_peer_privilege_from_real_credentials() -> None:
    assert is_privileged(Peer(os.getpid(), 0, 0), None)
    assert not is_privileged(Peer(os.getpid(), 65534, 65534), None)
    assert is_privileged(Peer(os.getpid(), 65534, 50), 50)
    if os.geteuid() != 0:
        pytest.skip("running a process with other groups needs root")
    proc = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=50,4", "sleep", "30"])
    try:
        peer = Peer(proc.pid, 65534, 65534)
        wait_for(lambda: 50 in peer.groups(), "setpriv to set the groups", 30, interval=0.01)  # then it execs
        assert {50, 4} <= peer.groups()
        assert is_privileged(peer, 50) and not is_privileged(peer, 12345)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = f"\0scratchfs-test-{os.getpid()}" if abstract else str(tmp_path / "n.sock")
    s.bind(addr)
    s.settimeout(10)
    try:
        env = {"NOTIFY_SOCKET": "@" + addr[1:] if abstract else addr}
        assert notify("READY=1", env)
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()
    assert not notify("READY=1", {})


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    img = tmp_path / "img.sqfs"
    subprocess.run(["mksquashfs", str(src), str(img), "-quiet", "-no-progress"], check=True, capture_output=True)
    return img


def test_copy_is_verified_and_matches_the_manifest_checksum(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    prog = Progress()
    res = copy_image(image, out / ".t.part", out / "img.sqfs", progress=prog)
    assert (out / "img.sqfs").read_bytes() == image.read_bytes()
    assert not (out / ".t.part").exists()
    assert res.checksum == image_checksum(image) and res.identity == Identity.of(image)
    assert prog.phase == "done" and prog.done == prog.total == image.stat().st_size
    assert verify_copy(out / "img.sqfs", res.checksum)
    with open(out / "img.sqfs", "r+b") as f:
        f.seek(2 * 1024 * 1024)
        b = f.read(1)
        f.seek(2 * 1024 * 1024)
        f.write(bytes([b[0] ^ 1]))
    assert not verify_copy(out / "img.sqfs", res.checksum)


def test_copy_refuses_a_damaged_source_an_existing_target_and_cancellation(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    write_manifest(image, describe_image(image, "f" * 64, 0.0))
    with pytest.raises(CopyError, match="manifest"):
        copy_image(image, out / ".t.part", out / "img.sqfs")
    assert os.listdir(out) == []
    write_manifest(image, describe_image(image, image_checksum(image), 0.0))
    (out / "img.sqfs").write_bytes(b"someone else's")
    with pytest.raises(CopyError, match="exists"):
        copy_image(image, out / ".t.part", out / "img.sqfs")
    assert os.listdir(out) == ["img.sqfs"] and (out / "img.sqfs").read_bytes() == b"someone else's"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CopyCancelled):
        copy_image(image, out / ".t.part", out / "other.sqfs", cancel=cancel)
    assert os.listdir(out) == ["img.sqfs"]


def test_copy_notices_a_source_changed_while_copying(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()

    class Meddling(Progress):
        """Rewrites part of the source after the first MiB was copied (a real concurrent change)."""

        _done = 0

        @property  # type: ignore[override]
        def done(self) -> int:
            return self._done

        @done.setter
        def done(self, v: int) -> None:
            if self._done == 0 and v > 0:
                with open(image, "r+b") as f:
                    f.seek(2 * 1024 * 1024)
                    f.write(b"\0" * 4096)
            self._done = v

    with pytest.raises(CopyError, match="changed while copying|verification failed"):
        copy_image(image, out / ".t.part", out / "img.sqfs", progress=Meddling())
    assert os.listdir(out) == []


class Steps(Progress):
    """Records the bytes of each read of a copy (progress is set after every one)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self._done = 0

    @property  # type: ignore[override]
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, v: int) -> None:
        if v:
            self.steps.append(v - self._done)
        self._done = v


def test_a_limited_copy_reads_in_small_pieces_and_hashes_the_same(tmp_path: Path) -> None:
    assert read_size(0) == READ_SIZE
    assert read_size(25 << 20) == PACED_READ_MIN  # 5 ms of 25 MiB/s: 128 KiB
    assert read_size(100 << 20) == 512 << 10  # 5 ms: 512 KiB, rounded down to a power of two
    assert read_size(10 << 30) == READ_SIZE
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(9 * 1024 * 1024 + 5))  # past the first 8 MiB hash piece
    image = tmp_path / "img.sqfs"
    subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-no-progress", "-noD"], check=True)
    out = tmp_path / "cache"
    out.mkdir()
    paced, whole = Steps(), Steps()
    res = copy_image(image, out / ".t.part", out / "paced.sqfs", bandwidth=100e6, progress=paced)
    full = copy_image(image, out / ".u.part", out / "whole.sqfs", progress=whole)
    assert max(paced.steps) == read_size(100e6) < max(whole.steps) == READ_SIZE
    assert res.checksum == full.checksum == image_checksum(image)
    assert (out / "paced.sqfs").read_bytes() == image.read_bytes()



class CancelAt(Steps):
    """Cancels the copy once it has copied *at* bytes (checked before its next read)."""

    def __init__(self, cancel: threading.Event, at: int) -> None:
        self.cancel, self.at = cancel, at
        super().__init__()

    @property  # type: ignore[override]
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, v: int) -> None:
        Steps.done.fset(self, v)  # type: ignore[attr-defined]
        if v >= self.at:
            self.cancel.set()


def test_a_cancelled_copy_goes_on_from_where_it_stopped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(19 * 1024 * 1024 + 5))  # three 8 MiB hash pieces
    image = tmp_path / "img.sqfs"
    subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-no-progress", "-noD"], check=True)
    size = image.stat().st_size
    out = tmp_path / "cache"
    out.mkdir()
    tmp, part = out / ".t.part", Partial()
    # Paced (512 KiB reads), cancelled 5.5 MiB in: the rest is read 1 MiB at a time from an
    # offset that is no multiple of 1 MiB, across the 8 MiB piece boundaries.
    cancel = threading.Event()
    with pytest.raises(CopyCancelled):
        copy_image(image, tmp, out / "img.sqfs", bandwidth=100e6, cancel=cancel, progress=CancelAt(cancel, 5632 << 10),
                   partial=part)  # fmt: skip
    assert part.pos == 5632 << 10 and tmp.stat().st_size == part.pos
    assert tmp.read_bytes() == image.read_bytes()[: part.pos]
    rest = Steps()
    res = copy_image(image, tmp, out / "img.sqfs", progress=rest, partial=part)
    assert rest.resumed == rest.steps[0] == 5632 << 10 and sum(rest.steps[1:]) == size - rest.resumed  # nothing read twice
    assert 512 << 10 in rest.steps[1:]  # up to the 8 MiB piece boundary, then 1 MiB reads
    assert res.checksum == image_checksum(image) and (out / "img.sqfs").read_bytes() == image.read_bytes()
    assert not tmp.exists()

    # A source changed since (mtime): started over, nothing of the old temp file kept.
    cancel = threading.Event()
    with pytest.raises(CopyCancelled):
        copy_image(image, tmp, out / "b.sqfs", cancel=cancel, progress=CancelAt(cancel, 3 << 20), partial=part)
    os.utime(image, ns=(1, 1))
    again = Steps()
    res = copy_image(image, tmp, out / "b.sqfs", progress=again, partial=part)
    assert again.resumed == 0 and sum(again.steps) == size and res.checksum == image_checksum(image)

    # The temp file damaged while it waited: the copy is refused, the temp file removed.
    cancel = threading.Event()
    with pytest.raises(CopyCancelled):
        copy_image(image, tmp, out / "c.sqfs", cancel=cancel, progress=CancelAt(cancel, 3 << 20), partial=part)
    with open(tmp, "r+b") as f:
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CopyError, match="verification failed"):
        copy_image(image, tmp, out / "c.sqfs", partial=part)
    assert sorted(os.listdir(out)) == ["b.sqfs", "img.sqfs"] and part.pos == 0

    # Without a Partial a cancelled copy leaves nothing.
    cancel = threading.Event()
    with pytest.raises(CopyCancelled):
        copy_image(image, tmp, out / "d.sqfs", cancel=cancel, progress=CancelAt(cancel, 3 << 20))
    assert sorted(os.listdir(out)) == ["b.sqfs", "img.sqfs"]

def test_writeback_keeps_a_copy_out_of_the_page_cache() -> None:
    """What a copy wrote is written back and dropped piece by piece, not left dirty in memory
    until the final fsync. On the disk under /var/tmp: tmpfs pages cannot be dropped."""
    work = Path(tempfile.mkdtemp(prefix="scratchfs-writeback-", dir="/var/tmp"))
    try:
        block = os.urandom(1 << 20)

        def write(name: str, piece: int | None) -> int:
            fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            wb = Writeback(fd, piece) if piece else None
            for i in range(32):
                os.write(fd, block)
                if wb:
                    wb((i + 1) << 20)
            os.close(fd)  # no fsync: what is resident now is what the writes left
            res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(work / name)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            return int(res.stdout)

        assert write("plain", None) == 32 << 20  # every written page still in memory
        assert write("paced", 4 << 20) <= 8 << 20  # only the newest piece or two
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_state_record_is_json_with_format(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    store.add(CachedCopy("x.sqfs", "x", "/s/x.sqfs", _ident(7), "cd" * 32, 2.0))
    store.save()
    doc = json.loads((tmp_path / ".scratchfs-mountd.json").read_text())
    assert doc["format"] == 1 and doc["copies"][0]["identity"]["size"] == 7


def test_throttle_holds_the_rate_and_does_not_catch_up_in_a_burst() -> None:
    now = [100.0]
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        now[0] += seconds
        return False

    t = Throttle(1000.0, threading.Event(), clock=lambda: now[0], wait=wait)
    for _ in range(10):
        t(500)  # 5000 bytes at 1000 B/s: due at 105 s
    assert now[0] == pytest.approx(105.0) and sum(waits) == pytest.approx(5.0)
    now[0] += 3.0  # the copier was slower than the limit for a while: no wait needed
    t(2000)
    assert now[0] == pytest.approx(108.0) and len(waits) == 10
    # ... but the 3 s lost are not made up at full speed: the next bytes go at the rate,
    # with at most the burst (50 ms here) of head start.
    t(1000)
    assert waits[-1] == pytest.approx(1.0 - 0.05) and now[0] == pytest.approx(108.95)
    t(1000)
    assert waits[-1] == pytest.approx(1.0) and now[0] == pytest.approx(109.95)
    cancelled = Throttle(1.0, threading.Event(), clock=lambda: 0.0, wait=lambda s: True)
    with pytest.raises(CopyCancelled):
        cancelled(10)
    unlimited = Throttle(0, threading.Event(), clock=lambda: 0.0, wait=lambda s: pytest.fail("waited"))
    unlimited(1 << 30)


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "scratchfs.cli", "status", "--socket", str(tmp_path / "none.sock")],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 3 and res.stderr.count("\n") == 1 and "not running" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "scratchfs.cli", "ctl", "pin", "--socket", str(tmp_path / "x")],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "needs a dataset name" in res.stderr, res.stderr


def test_logical_bytes_come_from_the_manifest(tmp_path: Path) -> None:
    """The policy's compression scale (image bytes per served byte) needs the logical size."""
    from mountd.daemon import _logical_bytes
    from scratchfs.image.manifest import Manifest, manifest_path, write_manifest

    img = tmp_path / "ds.sqfs"
    img.write_bytes(b"hsqs" + bytes(92))
    assert _logical_bytes(img) == 0  # no manifest: unknown
    write_manifest(img, Manifest(image_name="ds.sqfs", image_bytes=96, image_mtime_ns=0, superblock_hex="",
                                 checksum=None, created=0.0, logical_bytes=12345))  # fmt: skip
    assert _logical_bytes(img) == 12345
    manifest_path(img).write_text("{broken")
    assert _logical_bytes(img) == 0  # an unusable manifest is not fatal
    assert _logical_bytes(None) == 0


def test_a_demotion_warms_again_for_a_reader_that_overtook_the_warmed_bytes(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mover._warm decodes the next WARM_BYTES after each open file's position into the
    backing image, and again from where the reader got to if, meanwhile, it read past half of
    them (a fast reader outrunning a warm from slow scratch); at most WARM_PASSES times.

    The reader is a stand-in for the FUSE layer's read_positions (a list of positions, one per
    call), so the test controls how far it moves during each warm; the image and the warming
    are real, and what was warmed is read back from the block cache without loading."""
    import trio

    from mountd import mover
    from scratchfs.squashfs import Image
    from scratchfs.tiers import WARM_BYTES

    calls: list[list[int]] = []
    real = mover.warm_copy

    def recording(img: Image, positions: list[tuple[object, int]]) -> int:
        calls.append([off for _, off in positions])
        return real(img, positions)  # type: ignore[arg-type]

    monkeypatch.setattr(mover, "warm_copy", recording)
    img = Image.open(image)
    try:
        f = img.lookup(img.root, b"f")

        def warm(moves: list[int]) -> list[list[int]]:
            later = iter(moves)
            ops = type("Ops", (), {"read_positions": lambda self, ds: [(f, next(later, moves[-1]))]})()
            stand_in = type("M", (), {"_ops": ops})()
            calls.clear()
            trio.run(mover.Mover._warm, stand_in, type("Managed", (), {"ds": None})(), img, [(f, 0)])
            return calls

        assert warm([WARM_BYTES // 4]) == [[0]]  # the reader kept well inside the warmed bytes
        assert warm([WARM_BYTES * 3 // 4, WARM_BYTES * 3 // 4]) == [[0], [WARM_BYTES * 3 // 4]]
        racing = [WARM_BYTES * k for k in range(1, 10)]
        assert warm(racing) == [[0], [WARM_BYTES], [2 * WARM_BYTES]][: mover.WARM_PASSES]
        assert img.read_view(f, WARM_BYTES, WARM_BYTES // 2, load=False) is not None  # really decoded
    finally:
        img.close()


def test_a_pin_that_arrives_while_the_policy_chooses_is_not_undone_by_that_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """policy_round computes the policy's choice in a worker thread, so a `ctl pin` can land
    between the round's inputs and its demotions.  The choice here is a stand-in that pins
    "a" while it runs (as the control request would) and asks to demote both cached
    datasets: only "b" is demoted; "a" waits for the next round, which sees the pin.  The
    daemon's state and the round itself are real; demote is recorded instead of switching
    readers (there is no FUSE layer here)."""
    import trio

    from mountd import daemon
    from mountd.records import Managed, Settings
    from scratchfs.policy import Decision

    d = daemon.Daemon(Settings(datadirs=(tmp_path,), cachedir=tmp_path, mountdir=tmp_path))
    for name in ("a", "b"):
        d.managed[name] = Managed(name=name, ds=None, backing=tmp_path / f"{name}.sqfs", identity=None,  # type: ignore[arg-type]
                                  size=4096, cache_file=f"{name}.sqfs", promoted_at=0.0)  # fmt: skip
    in_trio: list[bool] = []  # whether the choice ran in trio's thread

    def choice(**kw: object) -> Decision:
        try:
            trio.lowlevel.current_task()
            in_trio.append(True)
        except RuntimeError:
            in_trio.append(False)
        d.ctl_pins.add("a")
        cached = frozenset(kw["cached"])  # type: ignore[arg-type]
        return Decision(hold=frozenset(), promote=frozenset(), demote=cached, budget=0)

    demoted: list[str] = []

    async def demote(m: Managed, why: str = "policy", keep: bool = True) -> bool:
        demoted.append(m.name)
        return True

    monkeypatch.setattr(daemon, "choose", choice)
    monkeypatch.setattr(d, "demote", demote)
    trio.run(d.policy_round)
    assert in_trio == [False]  # computed in a worker thread
    assert demoted == ["b"]
