#!/usr/bin/env python3
"""Read-path benchmark: kernel squashfs mount vs squashfuse_ll vs `scratchfs mount`, one run.

For each image (gzip and zstd by default) it measures, on every mount of the same image:
  seq-cold   sequential read of the large files after dropping caches and remounting (MB/s)
  seq-warm   the same read again (MB/s; warm figures: the median of 3 passes per round)
  small-cold every small file read once, caches dropped, fresh mount (files/s)
  small-warm again (files/s)
  walk-cold  find + lstat of every entry, caches dropped, fresh mount (entries/s)
  walk-warm  again (entries/s)
  par2-cold  two readers in parallel, each on its own large files, cold (MB/s total)
Readers are C tools (cat, find), so the client's own cost is small. Runs are interleaved
across mounts and repeated (--rounds); the median is reported, with ratios of scratchfs to
the kernel and to squashfuse_ll. Needs root (loop mounts, drop_caches).

    python tools/bench_read.py                 # ~20,000 small files + 4 x 256 MiB (the issue's data)
    python tools/bench_read.py --quick         # small data, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchfs.image.sample import generate_sample_tree  # noqa: E402

MOUNTS = ("kernel", "squashfuse_ll", "scratchfs")


def sh(cmd: list[str] | str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def set_readahead(mp: str, kb: int = 1024) -> None:
    dev = os.stat(mp).st_dev
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError:
        pass


class Mount:
    def __init__(self, kind: str, image: Path, mp: Path, scratchfs: str) -> None:
        self.kind, self.image, self.mp, self.scratchfs = kind, image, mp, scratchfs
        mp.mkdir(parents=True, exist_ok=True)

    def up(self) -> None:
        if self.kind == "kernel":
            sh(["mount", "-t", "squashfs", "-o", "loop,ro", str(self.image), str(self.mp)])
        elif self.kind == "squashfuse_ll":
            sh(["squashfuse_ll", str(self.image), str(self.mp)])
            set_readahead(str(self.mp))  # the same 1 MiB requests scratchfs asks for, to be fair
        else:
            sh([self.scratchfs, "mount", str(self.image), str(self.mp), "--log", "/dev/null"])
        deadline = time.time() + 10
        while not os.path.ismount(self.mp) and time.time() < deadline:
            time.sleep(0.05)

    def down(self) -> None:
        if self.kind == "kernel":
            sh(["umount", str(self.mp)])
        else:
            sh(["fusermount3", "-u", str(self.mp)])
        deadline = time.time() + 10
        while os.path.ismount(self.mp) and time.time() < deadline:
            time.sleep(0.05)


WARM_PASSES = 3  # warm figures: the median of this many passes per round


def run_cmd(cmd: str) -> float:
    """Seconds a shell command took."""
    t = time.perf_counter()
    sh(cmd)
    return time.perf_counter() - t


def bench_image(
    image: Path, tree: Path, work: Path, rounds: int, scratchfs: str, only: set[str] | None = None
) -> dict[str, dict[str, float]]:
    large = sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file() and p.stat().st_size >= 8 << 20)
    small = sorted(
        p.relative_to(tree) for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 8 << 20
    )
    entries = sum(1 for _ in tree.rglob("*")) + 1
    large_bytes = sum((tree / p).stat().st_size for p in large)
    small_list = work / "small.list"
    small_list.write_bytes(b"\0".join(os.fsencode(p) for p in small) + b"\0")
    half = len(large) // 2 or 1
    mounts = {k: Mount(k, image, work / f"mnt-{k}", scratchfs) for k in MOUNTS}
    results: dict[str, dict[str, list[float]]] = {k: {} for k in MOUNTS}

    def add(kind: str, name: str, value: float) -> None:
        results[kind].setdefault(name, []).append(value)

    for r in range(rounds):
        order = MOUNTS if r % 2 == 0 else tuple(reversed(MOUNTS))
        for kind in order:
            m = mounts[kind]
            mp = str(m.mp)
            cat_large = "cat " + " ".join(f"'{mp}/{p}'" for p in large) + " > /dev/null"
            cat_small = f"cd '{mp}' && xargs -0 -n 2000 cat < '{small_list}' > /dev/null"
            walk = f"find '{mp}' -printf '%s %m\\n' > /dev/null"
            par = (
                "(cat " + " ".join(f"'{mp}/{p}'" for p in large[:half]) + " > /dev/null & "
                "cat " + " ".join(f"'{mp}/{p}'" for p in large[half:] or large[:half]) + " > /dev/null & wait)"
            )
            par_bytes = sum((tree / p).stat().st_size for p in large[:half]) + sum(
                (tree / p).stat().st_size for p in (large[half:] or large[:half])
            )
            for name, cmd, amount in (
                ("seq", cat_large, large_bytes / 1e6),
                ("small", cat_small, len(small)),
                ("walk", walk, entries),
            ):
                if only and name not in only:
                    continue
                drop_caches()
                m.up()
                try:
                    add(kind, f"{name}-cold", float(amount) / run_cmd(cmd))
                    # a warm pass is short (1 GiB from the page cache in ~0.2 s): the median of a few
                    warm = [float(amount) / run_cmd(cmd) for _ in range(WARM_PASSES)]
                    add(kind, f"{name}-warm", statistics.median(warm))
                finally:
                    m.down()
            if only and "par2" not in only:
                continue
            drop_caches()
            m.up()
            try:
                add(kind, "par2-cold", par_bytes / 1e6 / run_cmd(par))
            finally:
                m.down()
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {k: {n: statistics.median(v) for n, v in d.items()} for k, d in results.items()}


UNITS = {"seq": "MB/s", "small": "files/s", "walk": "entries/s", "par2": "MB/s"}
TARGETS = {  # (metric, alternative, minimum ratio of scratchfs to it) from the issue
    "seq-cold": ("squashfuse_ll", 1.0),
    "seq-warm": ("kernel", 0.9),
    "walk-warm": ("kernel", 0.9),
    "small-cold": ("squashfuse_ll", 1.0),
    "small-warm": ("squashfuse_ll", 1.0),
    "walk-cold": ("squashfuse_ll", 1.0),
    "par2-cold": ("squashfuse_ll", 1.0),
}


def report(comp: str, res: dict[str, dict[str, float]]) -> None:
    print(f"\n## {comp}")
    print(f"{'metric':<11} {'unit':<10} {'kernel':>10} {'sqfuse_ll':>10} {'scratchfs':>10} {'vs kern':>8} {'vs ll':>7}  target")
    for metric in ("seq-cold", "seq-warm", "small-cold", "small-warm", "walk-cold", "walk-warm", "par2-cold"):
        k, s, o = (res[m].get(metric, float("nan")) for m in MOUNTS)
        alt, need = TARGETS[metric]
        ratio = o / (k if alt == "kernel" else s)
        verdict = "met" if ratio >= need else ("not measured" if ratio != ratio else "MISSED")
        unit = UNITS[metric.split("-")[0]]
        print(
            f"{metric:<11} {unit:<10} {k:>10.0f} {s:>10.0f} {o:>10.0f} {o / k:>8.2f} {o / s:>7.2f}  "
            f">= {need} x {alt}: {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 small files + 4 x 32 MiB, 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--comp", nargs="+", default=["gzip", "zstd"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", nargs="+", choices=("seq", "small", "walk", "par2"),
                    help="measure only these workloads (the others print nan)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_read: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("mksquashfs", "squashfuse_ll", "fusermount3"):
        if not shutil.which(tool):
            print(f"bench_read: {tool} not found (make deps)", file=sys.stderr)
            return 2
    scratchfs = shutil.which("scratchfs") or str(Path(sys.executable).parent / "scratchfs")
    n_small, large_size, rounds = (2000, 32 << 20, 1) if args.quick else (20000, 256 << 20, args.rounds)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scratchfs-bench-"))
    tree = work / "tree"
    try:
        if not tree.exists():
            print(f"generating sample tree in {tree} ...", file=sys.stderr)
            generate_sample_tree(tree, n_small=n_small, n_large=4, large_size=large_size, seed=1)
        print(f"cores: {os.cpu_count()}  kernel: {os.uname().release}  rounds: {rounds}")
        for comp in args.comp:
            image = work / f"bench-{comp}.sqfs"
            if not image.exists():
                print(f"building {image.name} ...", file=sys.stderr)
                sh(["mksquashfs", str(tree), str(image), "-comp", comp, "-noappend", "-quiet", "-no-progress"])
            res = bench_image(image, tree, work, rounds, scratchfs, set(args.only or ()))
            report(f"{comp} image ({image.stat().st_size / 1e6:.0f} MB, 128 KiB blocks)", res)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
