#!/usr/bin/env python3
"""`make demo`: build a sample dataset into an image, mount it, read it, show it, unmount.

Everything runs through the real command-line tools on generated data (no downloads):
  1. a deterministic sample tree (small text and binary files, two large files, links)
  2. `scratchfs image build` → sample.sqfs (+ manifest), `scratchfs image inspect`
  3. `scratchfs mount` (FUSE), a listing, reads compared byte for byte with the source
  4. `scratchfs umount`
  5. keepalive on a local profile: register, forecast, refresh, status
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scratchfs.image.sample import generate_sample_tree  # noqa: E402


def scratchfs_cmd() -> list[str]:
    script = Path(sys.executable).with_name("scratchfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scratchfs.cli"]


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

        step("5. keepalive on a local profile")
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
