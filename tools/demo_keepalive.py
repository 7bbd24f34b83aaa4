#!/usr/bin/env python3
"""keepalive demo: a temporary `local` profile, a generated tree with old access times,
forecast → refresh → status → forecast. Exits 0 when the refresh protected every file."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def keepalive_section() -> int:
    from scratchfs.keepalive.cli import main as ka

    top = Path(tempfile.mkdtemp(prefix="demo-keepalive-"))
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "XDG_STATE_HOME")}
    os.environ["XDG_CONFIG_HOME"] = str(top / "cfg")
    os.environ["XDG_STATE_HOME"] = str(top / "state")
    try:
        root = top / "scratch"
        ds = root / "datasets" / "demo"
        old = time.time() - 45 * 86400
        for d in range(20):
            sub = ds / f"part{d:02d}"
            sub.mkdir(parents=True)
            for i in range(250):
                p = sub / f"sample{i:03d}.npy"
                p.write_bytes(b"\0" * 64)
                os.utime(p, (old, old))
        print("== keepalive: a 5,000-file dataset last read 45 days ago, on a site purging after 30 days")
        steps = [
            ["init", "--profile", "local", "--root", str(root), "--purge-on", "atime", "--purge-age", "30d"],
            ["add", "--name", "demo", "--path", str(ds), "--keep-until", "2099-12-31"],
            ["forecast", "--name", "demo"],
            ["refresh", "--name", "demo", "--workers", "2"],
            ["status", "--name", "demo"],
            ["forecast", "--name", "demo"],
        ]
        for argv in steps:
            print(f"$ scratch-keepalive {' '.join(argv)}", flush=True)
            rc = ka(argv)
            sys.stdout.flush()
            if rc != 0:
                print(f"demo: step failed with exit status {rc}", file=sys.stderr)
                return rc
        files = [p for p in ds.rglob("*") if p.is_file()]
        stale = [p for p in files if os.lstat(p).st_atime < time.time() - 86400]
        moved = [p for p in files if abs(os.lstat(p).st_mtime - old) > 1e-3]
        if stale or moved:
            print(f"demo: {len(stale)} files still old, {len(moved)} mtimes changed", file=sys.stderr)
            return 1
        print("== keepalive demo: every file refreshed, mtimes kept")
        return 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(keepalive_section())
