"""Libraries built with the package (setup.py) and loaded with ctypes: the FUSE request hook
(``_fusehook.c``) and the block loader (``squashfs/_blockload.c``). Both are optional: without
them scratchfs runs, more slowly."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def load_built(
    where: Path,
    stem: str,
    disable_env: str,
    accept: Callable[[ctypes.CDLL], bool],
    mode: int = ctypes.DEFAULT_MODE,
) -> ctypes.CDLL | None:
    """The first ``STEM*.so`` in directory *where* that loads and that *accept* (which also sets
    up its functions' types) takes; None if there is none, or if the environment variable
    *disable_env* is "0"."""
    if os.environ.get(disable_env, "1") == "0":
        return None
    for path in sorted(where.glob(f"{stem}*.so")):
        try:
            lib = ctypes.CDLL(str(path), mode=mode)
            if accept(lib):
                return lib
        except (OSError, AttributeError) as e:
            log.debug("could not load %s: %s", path, e)
    return None
