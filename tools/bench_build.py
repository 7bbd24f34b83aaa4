#!/usr/bin/env python3
"""Benchmark `scratchfs image build` and `scratchfs image verify` against the bare tools.

Build: the same sample tree is built by our command and by a bare `mksquashfs` call with the
very options our command used (taken from the manifest it wrote); runs are interleaved and the
medians compared. The target is a ratio of at most 1.05: the wrapper must not cost. Our
command is also timed with --no-checksum, so the price of the manifest checksum is visible.

Verify: `scratchfs image verify` (every file decoded, all cores) against `unsquashfs -d` of the
same image (also all cores, writing the files out), both over the image in the page cache, in
MB/s of file data.

The default tree is the read benchmark's data (20,000 files of 4-64 KiB + 4 x 256 MiB, half
incompressible, 1.8 GB); a smaller one (e.g. --n-small 4000 --large-mib 128) shows the fixed
costs (interpreter start-up, scan, fsyncs) larger.

    .venv/bin/python tools/bench_build.py [--rounds 5] [--n-small 20000] [--n-large 4] [--large-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scratchfs.image.build import BuildOptions, build_image  # noqa: E402
from scratchfs.image.sample import generate_sample_tree  # noqa: E402
from scratchfs.image.verify import verify_image  # noqa: E402

PY = sys.executable


def timed(argv: list[str], **kw: object) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-small", type=int, default=20000)
    ap.add_argument("--n-large", type=int, default=4)
    ap.add_argument("--large-mib", type=int, default=256)
    ap.add_argument("--workdir", help="where to put the tree and images (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scratchfs-bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "tree"
        if not src.exists():
            t = time.perf_counter()
            st = generate_sample_tree(src, n_small=args.n_small, n_large=args.n_large, large_size=args.large_mib << 20)
            print(f"sample tree: {st.files} files, {st.logical_bytes / 1e6:.0f} MB ({time.perf_counter() - t:.1f} s to make)")
        ours = work / "ours.sqfs"
        bare = work / "bare.sqfs"
        cmd = [PY, "-m", "scratchfs.cli", "image", "build", "--force", str(src), str(ours)]
        # warm-up (page cache of the tree), and the options our command chose
        timed(cmd, cwd=REPO)
        manifest = json.loads((work / "ours.sqfs.manifest.json").read_text())
        argv = list(manifest["tool"]["argv"])
        argv[2] = str(bare)  # mksquashfs SRC DEST ...
        argv[0] = shutil.which(argv[0]) or argv[0]
        logical = manifest["logical_bytes"]
        print("options:", " ".join(argv[3:]))

        def ours_run() -> float:
            ours.unlink(missing_ok=True)  # as for the bare runs: freeing the old image is not timed
            return timed(cmd, cwd=REPO)

        def in_process(checksum: bool) -> float:
            ours.unlink(missing_ok=True)
            t = time.perf_counter()
            build_image(src, ours, BuildOptions(force=True, checksum=checksum))
            return time.perf_counter() - t

        def bare_run() -> float:
            bare.unlink(missing_ok=True)
            return timed(argv)

        def bare_synced() -> float:
            bare.unlink(missing_ok=True)
            return timed(argv) + timed(["sync", str(bare)])  # what a careful user adds: data on disk

        variants = {
            "bare mksquashfs": bare_run,
            "bare mksquashfs + sync of the image": bare_synced,
            "`scratchfs image build`": ours_run,
            "build_image()": lambda: in_process(True),
            "build_image(checksum=False)": lambda: in_process(False),
            "`scratchfs --version` (CLI start-up)": lambda: timed([PY, "-m", "scratchfs.cli", "--version"], cwd=REPO),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                subprocess.run(["sync"], check=True)  # no dirty pages of the previous run in the way
                times[k].append(variants[k]())
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"build, median of {args.rounds} runs (s):")
        for k, v in med.items():
            print(f"  {k:40s} {v:6.2f}")
        mb, mbs = med["bare mksquashfs"], med["bare mksquashfs + sync of the image"]
        mc, ml, mn = med["`scratchfs image build`"], med["build_image()"], med["build_image(checksum=False)"]
        print(f"build time ratio, whole command / bare mksquashfs: {mc / mb:.3f} (target <= 1.05)")
        print(f"build time ratio, whole command / bare mksquashfs + sync: {mc / mbs:.3f}")
        print(f"build time ratio, in-process (scan, build, fsync+checksum, manifest) / bare + sync: {ml / mbs:.3f}")
        print(f"build time ratio, in-process without the checksum / bare + sync: {mn / mbs:.3f}")
        print(f"image: {ours.stat().st_size / 1e6:.0f} MB, {logical / 1e6:.0f} MB of file data")

        # verify vs unsquashfs -d, image warm in the page cache for both
        out_dir = work / "unsquashed"
        t_ver, t_uns = [], []
        vcmd = [PY, "-m", "scratchfs.cli", "image", "verify", "--json", str(ours)]
        subprocess.run(vcmd, check=True, capture_output=True, cwd=REPO)  # warm-up
        for _ in range(args.rounds):
            shutil.rmtree(out_dir, ignore_errors=True)
            t_uns.append(timed(["unsquashfs", "-q", "-no-progress", "-d", str(out_dir), str(ours)]))
            t_ver.append(timed(vcmd, cwd=REPO))
        shutil.rmtree(out_dir, ignore_errors=True)
        t_in = [verify_image(ours).seconds for _ in range(args.rounds)]
        vu, vv, vi = statistics.median(t_uns), statistics.median(t_ver), statistics.median(t_in)
        print(f"verify throughput, median of {args.rounds}: unsquashfs -d {logical / vu / 1e6:.0f} MB/s | "
              f"`scratchfs image verify` {logical / vv / 1e6:.0f} MB/s (ratio {vu / vv:.2f}) | "
              f"verify_image() {logical / vi / 1e6:.0f} MB/s (ratio {vu / vi:.2f}) | {os.cpu_count()} cores")
        t = time.perf_counter()
        r = subprocess.run(vcmd[:-1] + ["--against", str(src), str(ours)], check=True, capture_output=True, cwd=REPO)
        ta = time.perf_counter() - t
        print(f"verify --against: {logical / ta / 1e6:.0f} MB/s (whole command, ok={json.loads(r.stdout)['ok']})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
