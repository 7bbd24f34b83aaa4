#!/usr/bin/env python3
"""Open time and memory of the reader on an image of N files (default 1,000,000).

Builds the image with gensquashfs from a pack file (1,000 directories x 1,000 small files, no
source tree needed), then in a fresh process: time of Image.open(), RSS after open, and RSS
after walking every entry and reading 1 % of the files (bounded by the inode, directory and
block caches, not by the image). Also prints `unsquashfs -s` time as the reference for reading
the superblock with the standard tool.

    python tools/bench_open.py [--files 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import psutil
from scratchfs.squashfs import Image
proc = psutil.Process()
base = proc.memory_info().rss
t = time.perf_counter()
img = Image.open(sys.argv[1])
open_s = time.perf_counter() - t
after_open = proc.memory_info().rss
t = time.perf_counter()
n = 0
peak = after_open
for i, (path, node) in enumerate(img.walk()):
    n += 1
    if node.is_file and i % 100 == 0:
        img.read(node, 0, 4096)
    if i % 50000 == 0:
        peak = max(peak, proc.memory_info().rss)
walk_s = time.perf_counter() - t
peak = max(peak, proc.memory_info().rss)
print(json.dumps(dict(open_s=open_s, base_mb=base / 1e6, open_mb=after_open / 1e6, walk_peak_mb=peak / 1e6,
                      entries=n, walk_s=walk_s)))
"""


def build(image: Path, files: int, work: Path) -> None:
    per_dir = 1000
    dirs = max(1, files // per_dir)
    payload = work / "payload"
    payload.write_bytes(b"x" * 100)
    pack = work / "pack.txt"
    with open(pack, "w") as f:
        for d in range(dirs):
            f.write(f"dir /d{d:05d} 0755 0 0\n")
            for i in range(per_dir):
                f.write(f"file /d{d:05d}/f{i:05d} 0644 0 0 {payload}\n")
    subprocess.run(["gensquashfs", "-F", str(pack), "-c", "zstd", "-q", "-f", str(image)], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scratchfs-open-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / f"files-{args.files}.sqfs"
    try:
        if not image.exists():
            print(f"building {image} with gensquashfs ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            build(image, args.files, work)
            print(f"built in {time.perf_counter() - t:.1f} s ({image.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
        t = time.perf_counter()
        subprocess.run(["unsquashfs", "-s", str(image)], check=True, capture_output=True)
        ref = time.perf_counter() - t
        res = json.loads(subprocess.run([sys.executable, "-c", PROBE, str(image), str(ROOT)], check=True,
                                        capture_output=True, text=True).stdout)  # fmt: skip
        print(f"image: {args.files:,} files + {args.files // 1000:,} dirs, {image.stat().st_size / 1e6:.0f} MB")
        print(f"Image.open():               {res['open_s'] * 1000:8.1f} ms   (target < 200 ms)")
        print(f"unsquashfs -s (reference):  {ref * 1000:8.1f} ms   (whole process)")
        print(f"RSS before open:            {res['base_mb']:8.1f} MB")
        print(f"RSS after open:             {res['open_mb']:8.1f} MB")
        print(f"RSS peak, full walk + reads:{res['walk_peak_mb']:8.1f} MB   ({res['entries']:,} entries in {res['walk_s']:.1f} s)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
