#!/usr/bin/env python3
"""`make demo`: build a sample dataset into an image, mount it, read it, show it, unmount.

Everything runs through the real command-line tools on generated data (no downloads):
  1. a deterministic sample tree (small text and binary files, two large files, links)
  2. `scratchfs image build` → sample.sqfs (+ manifest), `scratchfs image inspect`
  3. `scratchfs mount` (FUSE), a listing, reads compared byte for byte with the source
  4. `scratchfs umount`
  5. mountd (as root): the image served under one mountpoint with a second one, promoted to a
     local cache directory and back while a file stays open, `scratchfs status`, SIGTERM
  6. keepalive on a local profile: register, forecast, refresh, status
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scratchfs.image.sample import generate_sample_tree  # noqa: E402


def console_cmd(script: str, module: str) -> list[str]:
    """The installed console script beside this Python, or ``python -m module``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def scratchfs_cmd() -> list[str]:
    return console_cmd("scratchfs", "scratchfs.cli")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    print("$ scratchfs " + " ".join(args), flush=True)
    res = subprocess.run(scratchfs_cmd() + list(args), text=True, capture_output=True)
    if res.stdout.strip():
        print(res.stdout.rstrip())
    if res.returncode != 0:
        print(res.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo: `scratchfs {args[0]}` failed with exit code {res.returncode}")
    return res


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def demo_mountd(work: Path, image: Path, src: Path) -> int:
    """Run scratchfs-mountd over a data directory holding the sample image twice."""
    data, cache, mnt = work / "data", work / "cache", work / "mountd"
    for d in (data, cache, mnt):
        d.mkdir()
    shutil.copyfile(image, data / "sample.sqfs")
    shutil.copyfile(image, data / "sample.v2.sqfs")  # dots are kept: a second dataset
    config, sock = work / "mountd.toml", work / "mountd.sock"
    config.write_text(
        f'datadir = "{data}"\ncachedir = "{cache}"\nmountdir = "{mnt}"\n'
        'capacity = "1G"\nreserve = 0\nwindow = "1m"\nmin_residency = 0\ncopy_bandwidth = "200M"\n'
    )
    print(f"$ scratchfs-mountd --config {config} --socket {sock}", flush=True)
    res = subprocess.run(
        [*console_cmd("scratchfs-mountd", "mountd.main"), "--config", str(config), "--socket", str(sock), "--log", str(work / "mountd.log")],
        text=True,
        capture_output=True,
    )
    if res.returncode != 0:
        print(res.stderr.rstrip(), file=sys.stderr)
        return 1
    sockarg = ("--socket", str(sock))

    def status() -> dict[str, Any]:
        out = subprocess.run(scratchfs_cmd() + ["status", "--json", *sockarg], text=True, capture_output=True)
        if out.returncode != 0:
            raise SystemExit(f"demo: `scratchfs status` failed: {out.stderr.strip()}")
        return dict(json.loads(out.stdout))

    def tier(name: str) -> tuple[str, object]:
        d = next(d for d in status()["datasets"] if d["name"] == name)
        return d["tier"], d["copy"]

    def wait_tier(name: str, want: str) -> None:
        deadline = time.monotonic() + 60
        while tier(name) != (want, None):
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {name} did not reach tier {want} within 60 s")
            time.sleep(0.1)

    pid = 0
    try:
        pid = int(status()["pid"])
        print("mountdir:", " ".join(sorted(os.listdir(mnt))))
        big = max((p for p in src.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.stat().st_size)
        rel = big.relative_to(src)
        want = big.read_bytes()
        with open(mnt / "sample" / rel, "rb") as f:  # stays open across both switches
            half = len(want) // 2
            got = f.read(half)
            run("ctl", "prefetch", "sample", *sockarg)
            wait_tier("sample", "cache")
            got += f.read(len(want) // 4)
            run("status", *sockarg)
            run("ctl", "evict", "sample", *sockarg)
            wait_tier("sample", "scratch")
            got += f.read()
        same = got == want
        print(f"read {rel} ({len(want)} bytes) through one open file across a promotion and a demotion: "
              f"{'identical to the source' if same else 'DIFFERENT'}")  # fmt: skip
        deadline = time.monotonic() + 10  # the copy is deleted once no read uses it
        while any(p.suffix == ".sqfs" for p in cache.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        print("images in the cache directory after the demotion:", sorted(p.name for p in cache.glob("*.sqfs")) or "none")
        return 0 if same else 1
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while os.path.ismount(mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            print("SIGTERM: mountd " + ("still mounted" if os.path.ismount(mnt) else "unmounted and stopped"))
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="scratchfs-demo-"))
    mnt = work / "mnt"
    mounted = False
    try:
        step("1. generate a sample dataset")
        src = work / "dataset"
        stats = generate_sample_tree(src, n_small=500, n_large=2, large_size=8 << 20, seed=0)
        print(f"{src}: {stats.files} files, {stats.dirs} dirs, {stats.logical_bytes / 1e6:.1f} MB")

        step("2. build and inspect the image")
        image = work / "sample.sqfs"
        run("image", "build", str(src), str(image))
        run("image", "inspect", str(image))

        step("3. mount it read-only through FUSE and read it")
        mnt.mkdir()
        t0 = time.monotonic()
        run("mount", str(image), str(mnt), "--log", str(work / "mount.log"))
        mounted = True
        print(f"mounted in {time.monotonic() - t0:.2f} s")
        top = sorted(os.listdir(mnt))
        print("top level:", " ".join(top))
        files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
        t0 = time.monotonic()
        mismatches = [p for p in files if digest(p) != digest(mnt / p.relative_to(src))]
        took = time.monotonic() - t0
        total = sum(p.stat().st_size for p in files)
        print(f"read {len(files)} files ({total / 1e6:.1f} MB) through the mount in {took:.2f} s: "
              f"{'all identical to the source' if not mismatches else f'{len(mismatches)} DIFFER'}")  # fmt: skip
        if mismatches:
            return 1

        step("4. unmount")
        run("umount", str(mnt))
        mounted = False

        step("5. mountd: every image of a data directory under one mount, promoted and back")
        if os.geteuid() != 0:
            print("skipped: mountd mounts with allow_other and needs root (run `make demo` as root)")
        elif demo_mountd(work, image, src) != 0:
            return 1

        step("6. keepalive on a local profile")
        ka = HERE / "demo_keepalive.py"
        if ka.exists():
            res = subprocess.run([sys.executable, str(ka)], text=True)
            if res.returncode != 0:
                return res.returncode
        print("\ndemo finished: all steps succeeded")
        return 0
    finally:
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
