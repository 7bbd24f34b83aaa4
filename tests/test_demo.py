"""`make demo` runs `tools/demo.py`: run it whole, as the README promises, so it stays true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.usefixtures("need_mounts")]

DEMO = Path(__file__).resolve().parent.parent / "tools" / "demo.py"


def test_demo_runs_every_step() -> None:
    res = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "demo finished: all steps succeeded" in out
    # the mount read everything back identical, and so did one open file through mountd's switches
    assert "all identical to the source" in out
    assert "across a promotion and a demotion: identical to the source" in out
    assert "images in the cache directory after the demotion: none" in out
    assert "SIGTERM: mountd unmounted and stopped" in out
    assert "skipped" not in out
