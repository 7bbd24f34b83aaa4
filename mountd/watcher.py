"""Which images the data directories hold: NAME.sqfs / NAME.squashfs → dataset NAME.

:func:`map_names` is pure (file paths in, names out); :func:`scan` lists the directories and
reads each image's identity (one stat and a 96-byte read), blocking, for a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchfs.copier import Identity

log = logging.getLogger(__name__)

SUFFIXES = (".sqfs", ".squashfs")


def dataset_name(filename: str) -> str | None:
    """'imagenet.v1.sqfs' → 'imagenet.v1' (dots kept); None when not an image name."""
    if filename.startswith("."):
        return None  # hidden: temp files of copies or builds in progress
    for suffix in SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


def map_names(paths: Iterable[Path]) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """(name → image, name → the images that clash over it). Clashing names are refused."""
    by_name: dict[str, list[Path]] = {}
    for p in paths:
        name = dataset_name(p.name)
        if name is not None:
            by_name.setdefault(name, []).append(p)
    found = {n: ps[0] for n, ps in by_name.items() if len(ps) == 1}
    clashes = {n: sorted(ps) for n, ps in by_name.items() if len(ps) > 1}
    return found, clashes


@dataclass(frozen=True)
class Seen:
    path: Path
    identity: Identity | None  # None: could not be read this time
    error: str | None = None


def list_images(datadirs: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for d in datadirs:
        try:
            with os.scandir(d) as it:
                for e in it:
                    if dataset_name(e.name) is not None and e.is_file():
                        out.append(Path(d) / e.name)
        except FileNotFoundError:
            log.debug("data directory %s does not exist", d)
        except OSError as e:
            log.warning("cannot list data directory %s: %s", d, e.strerror)
    return out


def scan(datadirs: Sequence[Path]) -> tuple[dict[str, Seen], dict[str, list[Path]]]:
    """Blocking: every image of *datadirs* with its identity, and the refused clashes."""
    found, clashes = map_names(list_images(datadirs))
    seen: dict[str, Seen] = {}
    for name, path in found.items():
        try:
            seen[name] = Seen(path, Identity.of(path))
        except OSError as e:
            seen[name] = Seen(path, None, e.strerror or str(e))
    return seen, clashes
