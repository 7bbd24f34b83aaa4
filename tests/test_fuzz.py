"""Fuzz the squashfs reader with 3,000 mutated images: no crash, no hang, no unbounded memory.

Three small seed images (gzip; everything uncompressed, so mutations hit the structures
directly; gensquashfs/zstd) are mutated by `fuzz_worker.mutate` (byte and bit flips, truncation,
superblock field edits, overwritten runs and edge-value words in the metadata).  Worker
processes open, walk and read each mutant in-process; this side watches them: a worker that dies
by a signal is a crash, an image that does not finish within IMAGE_TIMEOUT is a hang (the worker
is killed and restarted after it), and any exception other than a SquashfsError — MemoryError
under the worker's RLIMIT_AS included — is a failure.  Every failing mutant is written out and
named in the assertion message.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import fuzz_worker, imagegen

PER_SEED = 1000
BATCH = 250
IMAGE_TIMEOUT = 30.0  # seconds for one tiny image; normal is milliseconds
RLIMIT_AS = 1 << 30
WORKER = Path(fuzz_worker.__file__)


@dataclass
class BatchResult:
    seed: str
    done: int = 0
    errors: int = 0
    ok_entries: int = 0
    failures: list[dict[str, object]] = field(default_factory=list)


def run_batch(seed: Path, first: int, last: int, workdir: Path, worker: Path = WORKER,
              image_timeout: float = IMAGE_TIMEOUT) -> BatchResult:  # fmt: skip
    """Run mutants [first, last) of `seed`, restarting the worker after a hang or a crash."""
    res = BatchResult(seed.name)
    nxt = first
    while nxt < last:
        errfile = workdir / f"stderr-{seed.stem}-{nxt}"
        with open(errfile, "wb") as err:
            proc = subprocess.Popen([sys.executable, str(worker), str(seed), str(nxt), str(last), str(workdir),
                                     "--rlimit-as", str(RLIMIT_AS)], stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current: int | None = None
        deadline = time.monotonic() + 120  # interpreter start and imports
        buf = b""
        hung = False
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                hung = True
                proc.kill()
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "begin" in msg:
                    current = msg["begin"]
                    deadline = time.monotonic() + image_timeout
                else:
                    assert msg["end"] == current
                    res.done += 1
                    if msg["outcome"] == "ok":
                        res.errors += int(msg["errors"])
                        res.ok_entries += int(msg["entries"])
                    else:
                        res.failures.append({"seed": seed.name, **msg})
                    current = None
                    nxt = msg["end"] + 1
        rc = proc.wait()
        sel.close()
        proc.stdout.close()
        if current is not None:  # died or hung in the middle of an image
            stderr = errfile.read_text(errors="replace")[-2000:]
            what = "hang" if hung else (f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
            res.failures.append({"seed": seed.name, "end": current, "outcome": what, "stderr": stderr})
            res.done += 1
            nxt = current + 1
        elif nxt < last:
            raise AssertionError(f"worker for {seed.name} stopped at {nxt} (exit {rc}) outside any image")
    return res


def _seed_images(base: Path) -> list[Path]:
    src = base / "seed-src"
    imagegen.build_fuzz_seed_tree(src)
    seeds = [
        (base / "gzip.sqfs", ["mksquashfs", str(src), str(base / "gzip.sqfs"), "-comp", "gzip", "-b", "4096"]),
        (base / "raw.sqfs", ["mksquashfs", str(src), str(base / "raw.sqfs"), "-b", "4096",
                             "-noI", "-noD", "-noF", "-noX"]),  # fmt: skip
        (base / "zstd-gen.sqfs", ["gensquashfs", "-q", "-D", str(src), "-x", "-k", "-c", "zstd", "-b", "4096",
                                  "--exportable", str(base / "zstd-gen.sqfs")]),  # fmt: skip
    ]
    for _path, cmd in seeds:
        if cmd[0] == "mksquashfs":
            cmd += ["-noappend", "-quiet", "-no-progress"]
        subprocess.run(cmd, check=True, capture_output=True)
    return [p for p, _ in seeds]


def test_seed_images_read_cleanly(tmp_path: Path) -> None:
    """Unmutated seeds go through the same worker with no error at all (the harness works)."""
    from scratchfs.squashfs import Image

    for seed in _seed_images(tmp_path):
        counts = fuzz_worker.exercise(str(seed))
        assert counts["errors"] == 0, seed
        with Image.open(seed) as img:
            assert counts["entries"] == len(list(img.walk())) > 50


def test_fuzz_mutated_images(tmp_path: Path) -> None:
    seeds = _seed_images(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    jobs = [(s, i, min(i + BATCH, PER_SEED)) for s in seeds for i in range(0, PER_SEED, BATCH)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda j: run_batch(j[0], j[1], j[2], work), jobs))
    done = sum(r.done for r in results)
    failures = [f for r in results for f in r.failures]
    assert done == PER_SEED * len(seeds) >= 2000
    # The mutants must exercise both paths: many rejected with SquashfsError, many still readable.
    assert sum(r.errors for r in results) > 200 and sum(r.ok_entries for r in results) > 10_000
    if failures:
        out = tmp_path / "failures"
        out.mkdir()
        lines = []
        for f in failures[:30]:
            seed = next(s for s in seeds if s.name == f["seed"])
            index = int(str(f["end"]))
            data, what = fuzz_worker.mutate(seed.read_bytes(), index)
            saved = out / f"{seed.stem}-{index}.sqfs"
            saved.write_bytes(data)
            detail = f.get("traceback") or f.get("stderr") or ""
            lines.append(f"{saved} ({what}): {f['outcome']} {f.get('type', '')} {f.get('message', '')}\n"
                         f"    {str(detail).strip().splitlines()[-3:] if detail else ''}")  # fmt: skip
        pytest.fail(f"{len(failures)} of {done} mutated images failed:\n" + "\n".join(lines))


FAKE_WORKER = """
import json, os, signal, sys, time
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    print(json.dumps({"begin": i}), flush=True)
    if i == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    if i == 3:
        time.sleep(3600)
    if i == 4:
        print(json.dumps({"end": i, "outcome": "exception", "type": "ValueError", "message": "m"}), flush=True)
        continue
    print(json.dumps({"end": i, "outcome": "ok", "errors": 0, "entries": 1}), flush=True)
"""


def test_harness_reports_crash_hang_and_exception(tmp_path: Path) -> None:
    """The watcher itself: a stand-in worker (the real reader cannot be made to crash on demand)
    segfaults on image 1, hangs on image 3 and reports a foreign exception on image 4."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    seed = tmp_path / "seed.sqfs"
    seed.write_bytes(b"")
    res = run_batch(seed, 0, 6, tmp_path, worker=fake, image_timeout=2.0)
    assert res.done == 6
    assert [(f["end"], f["outcome"]) for f in res.failures] == [(1, "killed by signal 11"), (3, "hang"),
                                                                (4, "exception")]  # fmt: skip
