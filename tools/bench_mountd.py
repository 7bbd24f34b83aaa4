#!/usr/bin/env python3
"""mountd benchmark, one run, figures against the alternatives measured in the same run.

Scratch is emulated as slow storage at --scratch-bw (default 100 MiB/s), in one of two ways
(--emulator): ``blkio`` (default), ext4 on a loop device whose reads are throttled by the
blkio cgroup controller (v1 ``blkio.throttle.read_bps_device`` or v2 ``io.max``) for the
mountd daemon; or ``link``, the same unthrottled ext4 seen through ``tools/throttlefs.py``, a
read-only FUSE passthrough behind one first-come-first-served link of that bandwidth (no
100 ms slices, see below). The cache directory is on the local disk.

(a) cold sequential throughput (``cat``) of a hot dataset's file through mountd before
    promotion (slow scratch) and after (cached copy), against reading the same cached image
    file directly with ``scratchfs mount``: ratio after / direct (target >= 0.9). Both use the
    same decoded-block cache size (--block-cache), smaller than the file, so that "cold" means
    cold for the process too, not only for the kernel.
(b) the longest stall a reader sees during a switch: a reader loops over a file (page cache
    dropped every pass so each read reaches FUSE) while the dataset is promoted and demoted
    --switches times; gaps between consecutive reads spanning a switch instant (from the
    daemon's log) vs the longest gap with no switch (target <= 50 ms). Run twice: first with
    scratch not throttled, which isolates the switch itself (a read in flight across a switch
    otherwise also waits for throttled scratch, which is the scratch's latency, not the
    switch's), then with scratch throttled as in (a) and (c), once with a reader as fast as it
    can and once with a reader paced at 30 % of the scratch bandwidth (a job consuming data at
    a steady rate). The blkio throttle works in 100 ms slices: a reader at the throttle's limit
    waits up to ~95 ms once per slice with no switch and no copy at all (the baseline line),
    so only the paced reader shows what a switch adds on blkio-throttled scratch (the ``link``
    emulator has no slices: there the full-speed reader shows it too). Each spanning gap
    is also split at the switch instant: the part after it is how long the read in flight
    still waited once the switch was made.
(c) read latency p50/p99 of another dataset (random 128 KiB reads, page caches dropped)
    while a copy runs (unlimited, then with copy_bandwidth = scratch bw / 4) vs idle.

Needs root (loop device, cgroups, drop_caches), mksquashfs. Medians of interleaved rounds.

    python tools/bench_mountd.py [--size-mb 192] [--rounds 9] [--switches 10] [--ssd disk|ram]
                                 [--emulator blkio|link] [--parts abc] [--trace-switches]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchfs.status_cmd import request  # noqa: E402

MiB = 1 << 20
BIN = Path(sys.executable).parent


def sh(cmd: list[str] | str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, text=True, capture_output=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def data_file(path: Path, size: int, seed: int) -> None:
    """Like most datasets, mostly incompressible: 3 MiB of random bytes, then 1 MiB of text, ..."""
    rng = random.Random(seed)
    words = b"alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega scratch dataset".split()
    text = b" ".join(rng.choice(words) for _ in range(180_000))[: MiB - 4096]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = rng.randbytes(3 * MiB + 4096) + text
            f.write(chunk[:left])
            left -= len(chunk)


def loop_ext4(file: Path, size_mb: int, mountpoint: Path) -> str:
    """A fresh ext4 of *size_mb* in *file*, on a loop device mounted at *mountpoint*."""
    with open(file, "wb") as f:
        f.truncate(size_mb * MiB)
    sh(["mkfs.ext4", "-q", "-F", str(file)])
    loop = sh(["losetup", "--find", "--show", str(file)]).stdout.strip()
    mountpoint.mkdir()
    sh(["mount", loop, str(mountpoint)])
    return loop


class Throttled:
    """blkio-throttled scratch: ``dir`` is what mountd reads, ``raw`` where images are written."""

    def __init__(self, top: Path, bps: int, size_mb: int) -> None:
        self.top, self.bps = top, bps
        self.file, self.dir = top / "scratch.ext4", top / "scratch"
        self.raw = self.dir
        self.loop = ""
        self.cgroup: Path | None = None
        self.loop = loop_ext4(self.file, size_mb, self.dir)
        rdev = os.stat(self.loop).st_rdev
        self.dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        name = f"scratchfs-bench-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/blkio")
        self.v1 = (v1 / "blkio.throttle.read_bps_device").exists()
        if self.v1:
            self.cgroup = v1 / name
            self.cgroup.mkdir()
        else:
            root = Path("/sys/fs/cgroup")
            (root / "cgroup.subtree_control").write_text("+io")
            self.cgroup = root / name
            self.cgroup.mkdir()
        self.limit(bps)

    def limit(self, bps: int | None) -> None:
        """Throttle reads of the scratch device to *bps* bytes/s (None: no limit)."""
        assert self.cgroup is not None
        if self.v1:
            (self.cgroup / "blkio.throttle.read_bps_device").write_text(f"{self.dev} {bps or 0}\n")
        else:
            (self.cgroup / "io.max").write_text(f"{self.dev} rbps={bps or 'max'}\n")

    def admit(self, pid: int) -> None:
        assert self.cgroup is not None
        (self.cgroup / "cgroup.procs").write_text(f"{pid}\n")

    def close(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                for pid in (self.cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.cgroup.parent / "cgroup.procs").write_text(pid + "\n")
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
        sh(["umount", "-l", str(self.dir)], check=False)
        sh(["losetup", "-d", self.loop], check=False)


class LinkThrottled:
    """Scratch behind tools/throttlefs.py: ext4 on a loop device (``raw``, not throttled) seen
    through a FUSE passthrough whose reads share one link of *bps* bytes/s (``dir``)."""

    def __init__(self, top: Path, bps: int, size_mb: int) -> None:
        self.file, self.raw, self.dir = top / "scratch.ext4", top / "scratch-raw", top / "scratch"
        self.rate, self.log = top / "link.rate", top / "throttlefs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop = loop_ext4(self.file, size_mb, self.raw)
        self.rate.write_text(f"{bps}\n")
        self.dir.mkdir()
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("throttlefs.py")), str(self.raw), str(self.dir),
                 "--rate-file", str(self.rate)], stdout=logf, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"throttlefs did not mount: {self.log.read_text().strip()}")
            time.sleep(0.05)

    def limit(self, bps: int | None) -> None:
        """Set the link to *bps* bytes/s (None: no limit); returns once throttlefs has it."""
        assert self.proc is not None
        seen = self.log.read_text().count("rate now")
        self.rate.write_text(f"{bps or 0}\n")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log.read_text().count("rate now") == seen:
            if time.monotonic() > deadline:
                raise SystemExit("throttlefs did not take the new rate")
            time.sleep(0.01)

    def admit(self, pid: int) -> None:
        pass  # the link throttles every reader of ``dir``

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if os.path.ismount(self.dir):
            sh(["umount", "-l", str(self.dir)], check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        sh(["umount", "-l", str(self.raw)], check=False)
        sh(["losetup", "-d", self.loop], check=False)


class RamSSD:
    """The node-local SSD as its own device: ext4 on a loop device backed by a file in /dev/shm.

    On a real node scratch is a network filesystem and the SSD a local disk: copying to the SSD
    and verifying the copy do not compete with scratch reads for one device. With scratch and
    the cache directory on the same local disk (--ssd disk) they do.
    """

    def __init__(self, top: Path, size_mb: int) -> None:
        self.file = Path("/dev/shm") / f"scratchfs-bench-ssd-{os.getpid()}.ext4"
        self.dir = top / "ssd"
        self.loop = loop_ext4(self.file, size_mb, self.dir)

    def close(self) -> None:
        sh(["umount", "-l", str(self.dir)], check=False)
        if self.loop:
            sh(["losetup", "-d", self.loop], check=False)
        self.file.unlink(missing_ok=True)


class Mountd:
    def __init__(self, top: Path, datadir: Path, cache: Path) -> None:
        self.top = top
        self.cache, self.mnt = cache, top / "mnt"
        self.cache.mkdir()
        self.mnt.mkdir()
        self.sock, self.log, self.config = top / "ctl.sock", top / "mountd.log", top / "mountd.toml"
        self.datadir = datadir
        self.write_config(0, ["hot"])
        self.pid = 0

    def write_config(self, bw: int, never: list[str] | None = None) -> None:
        """Promotions only on request: "other" is never cached (it stands for a dataset that
        stays on scratch in (c)), nor "hot" before (a) has measured it on scratch. Without
        this the policy promotes either on its own while it is being measured."""
        names = ", ".join(f'"{n}"' for n in ["other", *(never or [])])
        self.config.write_text(
            f'datadir = "{self.datadir}"\ncachedir = "{self.cache}"\nmountdir = "{self.mnt}"\n'
            f'capacity = "4G"\nreserve = 0\nwindow = "10m"\nmin_residency = 0\ncopy_bandwidth = {bw}\n'
            f"never_cache = [{names}]\n"
        )

    def start(self, block_cache: str) -> None:
        res = sh([str(BIN / "scratchfs-mountd"), "--config", str(self.config), "--socket", str(self.sock),
                  "--log", str(self.log), "--policy-interval", "0.5", "--scan-interval", "1",
                  "--block-cache", block_cache], check=False)  # fmt: skip
        if res.returncode != 0:
            raise SystemExit(f"scratchfs-mountd failed: {res.stderr}")
        self.pid = int(self.status()["pid"])

    def status(self) -> dict[str, Any]:
        return dict(request(str(self.sock), {"op": "status"})["status"])

    def ds(self, name: str) -> dict[str, Any]:
        return next(d for d in self.status()["datasets"] if d["name"] == name)

    def ctl(self, *args: str) -> None:
        sh([str(BIN / "scratchfs"), "ctl", *args, "--socket", str(self.sock)])

    def wait_tier(self, name: str, tier: str) -> None:
        deadline = time.monotonic() + 300
        while True:
            d = self.ds(name)
            if d["tier"] == tier and d["copy"] is None:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} never reached tier {tier}")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_mountd(self.pid, self.mnt)


def stop_mountd(pid: int, mnt: Path) -> None:
    """SIGTERM to the daemon *pid* (0: none), then wait up to 30 s for *mnt* to be unmounted
    (it unmounts itself, and its trace and state files are written by then); lazily unmount
    what is left."""
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
    if os.path.ismount(mnt):
        sh(["umount", "-l", str(mnt)], check=False)


def cat_rate(path: Path) -> float:
    size = path.stat().st_size
    drop_caches()
    t = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return size / (time.perf_counter() - t) / 1e6


def log_lines(log: Path) -> list[tuple[float, str]]:
    """The daemon log's time-stamped lines, with their times."""
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append((datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return out


def log_times(log: Path, pattern: str) -> list[float]:
    return [t for t, line in log_lines(log) if re.search(pattern, line)]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mb", type=int, default=192, help="size of the hot dataset's file")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds of (a), the median of which is shown")
    ap.add_argument("--switches", type=int, default=10, help="promotions (and as many demotions) in (b)")
    ap.add_argument("--scratch-bw", type=int, default=100, help="emulated scratch read bandwidth, MiB/s")
    ap.add_argument("--ssd", choices=("disk", "ram"), default="disk",
                    help="cache directory on the local disk that also holds scratch's loop file (default), "
                         "or on its own RAM-backed device (see RamSSD)")
    ap.add_argument("--emulator", choices=("blkio", "link"), default="blkio",
                    help="slow scratch: blkio throttle of a loop device (default) or tools/throttlefs.py's link")
    ap.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run (default: abc)")
    ap.add_argument("--trace-switches", action="store_true",
                    help="(b): print the daemon's log lines around the longest gap spanning a promotion and a demotion")
    ap.add_argument("--block-cache", default="64M",
                    help="decoded-block cache per image, the same for mountd and scratchfs mount (default 64M)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_mountd: needs root (loop device, cgroups, drop_caches)", file=sys.stderr)
        return 7
    # SIGTERM (kill, a batch system's time limit) unwinds like Ctrl-C: the finally below stops
    # mountd and throttlefs, unmounts and detaches the loop device instead of leaving them.
    signal.signal(signal.SIGTERM, _terminated)
    top = Path(tempfile.mkdtemp(prefix="bench-mountd-", dir="/var/tmp"))
    scratch: Throttled | LinkThrottled | None = None
    ssd: RamSSD | None = None
    md: Mountd | None = None
    direct = top / "direct"
    try:
        emulator = Throttled if args.emulator == "blkio" else LinkThrottled
        scratch = emulator(top, args.scratch_bw * MiB, args.size_mb * 3 + 256)
        for name, mb, seed in (("hot", args.size_mb, 1), ("other", 64, 2)):
            src = top / f"src-{name}"
            src.mkdir()
            data_file(src / "data", mb * MiB, seed)
            sh(["mksquashfs", str(src), str(scratch.raw / f"{name}.sqfs"), "-quiet", "-no-progress"])
            shutil.rmtree(src)
        if args.ssd == "ram":
            ssd = RamSSD(top, args.size_mb * 3 + 256)
        md = Mountd(top, scratch.dir, (ssd.dir if ssd else top) / "cache")
        md.start(args.block_cache)
        scratch.admit(md.pid)
        hot, other = md.mnt / "hot" / "data", md.mnt / "other" / "data"
        print(f"# scratch emulated at {args.scratch_bw} MiB/s ({'blkio throttle on a loop device' if args.emulator == 'blkio' else 'throttlefs link over a loop device'}); "
              f"cache directory on {'its own RAM-backed device' if ssd else 'the same local disk'}; "
              f"hot file {args.size_mb} MiB; cold reads (caches dropped); block cache {args.block_cache} per image; "
              f"medians of {args.rounds}")  # fmt: skip

        # (a) ------------------------------------------------------------------------------
        def part_a() -> None:
            before = [cat_rate(hot) for _ in range(args.rounds)]
            if md.ds("hot")["tier"] != "scratch" or log_times(md.log, r"promoted hot:"):
                raise SystemExit("hot was promoted while it was measured on scratch")
            md.write_config(0)
            md.ctl("reload")
            md.ctl("prefetch", "hot")
            md.wait_tier("hot", "cache")
            cached = Path(md.ds("hot")["cache_file"])
            direct.mkdir()
            sh([str(BIN / "scratchfs"), "mount", str(cached), str(direct), "--log", str(top / "direct.log"),
                "--cache-size", args.block_cache])  # fmt: skip
            after: list[float] = []
            alone: list[float] = []
            pairs: list[tuple[list[float], Path]] = [(after, hot), (alone, direct / "data")]
            for i in range(args.rounds):  # which goes first alternates: no order effect in the ratio
                for into, path in pairs if i % 2 == 0 else pairs[::-1]:
                    into.append(cat_rate(path))
            sh([str(BIN / "scratchfs"), "umount", str(direct)])
            b, a, d = statistics.median(before), statistics.median(after), statistics.median(alone)
            print("(a) hot dataset, cold sequential read")
            print(f"    mountd before promotion (scratch) {b:8.1f} MB/s")
            print(f"    mountd after promotion (cache)    {a:8.1f} MB/s   x{a / b:.2f} vs before")
            print(f"    scratchfs mount of the cached copy {d:7.1f} MB/s")
            print(f"    ratio after / direct              {a / d:8.3f}   (target >= 0.9)")

        # (b) ------------------------------------------------------------------------------
        def stalls(throttled: bool, pace: float | None = None) -> None:
            stamps: list[float] = []
            starts: list[float] = []
            stop = threading.Event()
            errors: list[str] = []

            def reader() -> None:
                fd = os.open(hot, os.O_RDONLY)
                size = os.fstat(fd).st_size
                try:
                    while not stop.is_set():
                        off = 0
                        while off < size and not stop.is_set():
                            starts.append(time.time())
                            n = len(os.pread(fd, 128 * 1024, off))
                            if n == 0:
                                errors.append(f"short read at {off}")
                                return
                            off += n
                            stamps.append(time.time())
                            if pace:  # the next read is due when the reader has consumed this one
                                due = starts[-1] + n / pace
                                if due > stamps[-1]:
                                    time.sleep(due - stamps[-1])
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError as e:
                    errors.append(repr(e))
                finally:
                    os.close(fd)

            # Copies limited to half the scratch bandwidth, as a site would configure: an
            # unlimited copy starves the reader's own scratch reads.
            switch_bw = args.scratch_bw * MiB // 2
            scratch.limit(args.scratch_bw * MiB if throttled else None)
            md.write_config(switch_bw)
            md.ctl("reload")
            md.ctl("evict", "hot")
            md.wait_tier("hot", "scratch")
            t = threading.Thread(target=reader)
            t.start()
            time.sleep(3)  # baseline: no switch
            base_end = time.time()
            for _ in range(args.switches):
                md.ctl("prefetch", "hot")
                md.wait_tier("hot", "cache")
                time.sleep(0.3)
                md.ctl("evict", "hot")
                md.wait_tier("hot", "scratch")
                time.sleep(0.3)
            stop.set()
            t.join()
            scratch.limit(args.scratch_bw * MiB)
            gaps = [(stamps[i - 1], stamps[i]) for i in range(1, len(stamps))]
            base_gaps = [e - s for s, e in gaps if e <= base_end]
            during = [e - s for s, e in gaps if s > base_end]
            reads = list(zip(starts, stamps))

            def at(pattern: str) -> tuple[list[float], list[float], list[float], tuple[float, float]]:
                """Per switch: the gap spanning it, the first read issued after it, the gap's part
                after it; and the longest spanning gap itself (start, end)."""
                instants = [w for w in log_times(md.log, pattern) if w > base_end]
                spanning = [max(((s, e) for s, e in gaps if s - 0.002 <= w <= e + 0.002),
                                key=lambda g: g[1] - g[0], default=(w, w)) for w in instants]  # fmt: skip
                spans = [e - s for s, e in spanning]
                after = [max(0.0, e - w) for (_, e), w in zip(spanning, instants)]
                firsts = [next((e - s for s, e in reads if s >= w), 0.0) for w in instants]
                longest = max(spanning, key=lambda g: g[1] - g[0], default=(0.0, 0.0))
                return spans, firsts, after, longest

            (promo, promo1, promo_after, promo_gap), (demo, demo1, demo_after, demo_gap) = (
                at(r"promoted hot:"), at(r"demoted hot \("))  # fmt: skip
            where = (f"scratch throttled to {args.scratch_bw} MiB/s" if throttled
                     else "scratch not throttled (the switch alone)")  # fmt: skip
            who = f"a reader paced at {pace / MiB:.0f} MiB/s" if pace else "a reader as fast as it can"
            print(f"(b) reader stalls, {where}: {len(promo)} promotions + {len(demo)} demotions under {who} "
                  f"({len(stamps)} reads of 128 KiB, errors: {len(errors)}; copies limited to {switch_bw // MiB} MiB/s)")  # fmt: skip
            print(f"    longest gap spanning a promotion  {max(promo) * 1e3:8.1f} ms   (target <= 50 ms); "
                  f"median {statistics.median(promo) * 1e3:.1f} ms; after the switch instant "
                  f"{max(promo_after) * 1e3:.1f} ms max")  # fmt: skip
            print(f"    first read after a promotion      {max(promo1) * 1e3:8.1f} ms max; median {statistics.median(promo1) * 1e3:.1f} ms")
            print(f"    longest gap spanning a demotion   {max(demo) * 1e3:8.1f} ms   (target <= 50 ms); "
                  f"median {statistics.median(demo) * 1e3:.1f} ms; after the switch instant "
                  f"{max(demo_after) * 1e3:.1f} ms max")  # fmt: skip
            print(f"    first read after a demotion       {max(demo1) * 1e3:8.1f} ms max; median {statistics.median(demo1) * 1e3:.1f} ms")
            if args.trace_switches:
                for what, (s0, e0) in (("promotion", promo_gap), ("demotion", demo_gap)):
                    print(f"      the daemon's log around the longest gap spanning a {what} ({(e0 - s0) * 1e3:.1f} ms):")
                    for logged, line in log_lines(md.log):
                        if s0 - 0.5 <= logged <= e0 + 0.01:
                            print(f"        {(logged - s0) * 1e3:+7.1f} ms {line[24:].strip()[:120]}")
            print(f"    longest gap, no switch (baseline) {max(base_gaps) * 1e3:8.1f} ms; p99 {pct(base_gaps, 0.99) * 1e3:.1f} ms")
            print(f"    longest gap over the whole switching phase (copies included) {max(during) * 1e3:.1f} ms")
            instants = [w for w in log_times(md.log, r"promoted hot:|demoted hot \(") if w > base_end]
            away = [e - s for s, e in gaps if s > base_end and all(not (s - 0.05 <= w <= e + 0.05) for w in instants)]
            if away:
                print(f"    gaps of the same phase away from any switch (>= 50 ms from one): longest {max(away) * 1e3:.1f} ms, "
                      f"p99 {pct(away, 0.99) * 1e3:.1f} ms")  # fmt: skip
                # Where the longest one fell: the daemon's last log line before it (copy start, end, ...).
                s0, e0 = max(((s, e) for s, e in gaps if s > base_end and e - s == max(away)))
                before = [(logged, line) for logged, line in log_lines(md.log) if logged <= e0]
                if before:
                    logged, line = before[-1]
                    print(f"      it began {(s0 - logged) * 1e3:.0f} ms after the daemon logged: {line[24:].strip()[:110]}")


        # (c) ------------------------------------------------------------------------------
        def part_c() -> None:
            def latencies(until: threading.Event | None, count: int) -> list[float]:
                fd = os.open(other, os.O_RDONLY)
                bfd = os.open(scratch.dir / "other.sqfs", os.O_RDONLY)
                size = os.fstat(fd).st_size
                rng = random.Random(5)
                out: list[float] = []
                try:
                    while (until is None and len(out) < count) or (until is not None and not until.is_set()):
                        off = rng.randrange(0, size // (128 * 1024)) * 128 * 1024
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.posix_fadvise(bfd, 0, 0, os.POSIX_FADV_DONTNEED)
                        t0 = time.perf_counter()
                        os.pread(fd, 128 * 1024, off)
                        out.append(time.perf_counter() - t0)
                finally:
                    os.close(fd)
                    os.close(bfd)
                return out

            def during_copy(bw: int) -> list[float]:
                md.write_config(bw)
                md.ctl("reload")
                md.ctl("evict", "hot")
                md.wait_tier("hot", "scratch")
                done = threading.Event()
                res: list[float] = []
                th = threading.Thread(target=lambda: res.extend(latencies(done, 0)))
                md.ctl("prefetch", "hot")
                th.start()
                md.wait_tier("hot", "cache")
                done.set()
                th.join()
                return res

            idle = latencies(None, 300)
            busy = during_copy(0)
            limit = args.scratch_bw * MiB // 4
            limited = during_copy(limit)
            idle2 = latencies(None, 300)
            idle += idle2
            if md.ds("other")["tier"] != "scratch" or log_times(md.log, r"promoted other:"):
                raise SystemExit("other was promoted while it was measured on scratch")
            print("(c) another dataset on scratch: random 128 KiB reads, caches dropped")
            for label, xs in (("idle", idle), ("while a copy runs (no limit)", busy),
                              (f"while a copy runs (limit {limit // MiB} MiB/s)", limited)):  # fmt: skip
                print(f"    {label:38s} p50 {pct(xs, 0.5) * 1e3:7.2f} ms  p99 {pct(xs, 0.99) * 1e3:7.2f} ms  ({len(xs)} reads)")
            print(f"    p99 ratio copy/idle: no limit x{pct(busy, 0.99) / pct(idle, 0.99):.3f}, "
                  f"limited x{pct(limited, 0.99) / pct(idle, 0.99):.3f}")  # fmt: skip

        if "a" in args.parts:
            part_a()
        if "b" in args.parts:
            stalls(throttled=False)
            stalls(throttled=True)
            stalls(throttled=True, pace=args.scratch_bw * MiB * 0.3)
        if "c" in args.parts:
            part_c()
        return 0
    finally:
        if direct.exists() and os.path.ismount(direct):
            sh(["umount", "-l", str(direct)], check=False)
        if md is not None:
            md.stop()
        if scratch is not None:
            scratch.close()
        if ssd is not None:
            ssd.close()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
