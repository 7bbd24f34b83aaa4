"""The files mountd created in the cache directory, and nothing else.

mountd deletes only what it created. Before a copy starts its temp file is recorded here; a
finished copy is recorded with the identity of the image it copies (size, mtime, superblock
of the backing file) and the checksum of its content, so that after a restart it can be
verified and adopted. Everything else in the cache directory is never touched.

The record is one JSON state file written through :mod:`scratchfs.state` (atomic, fsynced).
An unreadable record is a warning and a fresh start (and then nothing is deleted, since
nothing is known to be ours).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchfs.copier import Identity
from scratchfs.state import atomic_write_json, read_json

log = logging.getLogger(__name__)

STATE_NAME = ".scratchfs-mountd.json"
LOCK_NAME = ".scratchfs-mountd.lock"
FORMAT = 1
TEMP_SUFFIX = ".part"


@dataclass(frozen=True)
class CachedCopy:
    file: str  # basename in the cache directory
    dataset: str
    backing: str  # path of the image it copies
    identity: Identity  # of the backing image when copied
    checksum: str  # tree checksum of the content (see scratchfs.copier.verify_copy)
    created: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dataset": self.dataset,
            "backing": self.backing,
            "identity": self.identity.to_json(),
            "checksum": self.checksum,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: Any) -> CachedCopy:
        return cls(
            file=str(d["file"]),
            dataset=str(d["dataset"]),
            backing=str(d["backing"]),
            identity=Identity.from_json(d["identity"]),
            checksum=str(d["checksum"]),
            created=float(d["created"]),
        )


class CacheStore:
    """The record of our files in *cachedir*. Mutated on the daemon's thread; saved in workers."""

    def __init__(self, cachedir: str | os.PathLike[str]) -> None:
        self.dir = Path(cachedir)
        self.path = self.dir / STATE_NAME
        self.copies: dict[str, CachedCopy] = {}  # by file name
        self.temps: set[str] = set()
        self._counter = itertools.count(1)
        self._save_lock = threading.Lock()

    # ------------------------------------------------------------------ persistence
    def load(self) -> None:
        try:
            doc = read_json(self.path, default=None)
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s): starting with an empty record", self.path, e)
            doc = None
        if doc is None:
            return
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            self.temps = {str(t) for t in doc.get("temps", [])}
            self.copies = {}
            for raw in doc.get("copies", []):
                c = CachedCopy.from_json(raw)
                self.copies[c.file] = c
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            log.warning("%s is not a usable record (%s): starting with an empty one", self.path, e)
            self.copies, self.temps = {}, set()

    def document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "temps": sorted(self.temps),
            "copies": [self.copies[k].to_json() for k in sorted(self.copies)],
        }

    def write(self, doc: dict[str, Any]) -> None:
        """Blocking: write a document taken with :meth:`document` (serialised)."""
        with self._save_lock:
            atomic_write_json(self.path, doc)

    def save(self) -> None:
        self.write(self.document())

    # ------------------------------------------------------------------ names
    def _safe(self, name: str) -> bool:
        return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(".scratchfs")

    def new_temp(self, dataset: str) -> Path:
        """A fresh temp file name for a copy of *dataset*, recorded (call save() before use)."""
        while True:
            name = f".{dataset}.{os.getpid()}.{next(self._counter)}{TEMP_SUFFIX}"
            if not (self.dir / name).exists() and name not in self.temps:
                break
        self.temps.add(name)
        return self.dir / name

    def final_path(self, dataset: str) -> Path:
        """Where a finished copy of *dataset* goes: never a name that exists already."""
        for k in itertools.count(0):
            name = f"{dataset}.sqfs" if k == 0 else f"{dataset}~{k}.sqfs"
            if name not in self.copies and not os.path.lexists(self.dir / name):
                return self.dir / name
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ changes
    def add(self, copy: CachedCopy) -> None:
        self.copies[copy.file] = copy

    def delete(self, file: str) -> bool:
        """Remove a file we created (and its record). Blocking unlink; False if not ours."""
        if file not in self.copies and file not in self.temps:
            log.error("refusing to delete %s: not created by mountd", self.dir / file)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / file)
        self.copies.pop(file, None)
        self.temps.discard(file)
        return True

    def remove_temps(self) -> int:
        """Delete every recorded temp file (left by a crash). Returns how many existed."""
        n = 0
        for name in list(self.temps):
            try:
                os.unlink(self.dir / name)
                n += 1
                log.info("removed leftover temp file %s", self.dir / name)
            except FileNotFoundError:
                pass
            self.temps.discard(name)
        return n

    def used_bytes(self) -> int:
        total = 0
        for name in list(self.copies) + list(self.temps):
            with contextlib.suppress(OSError):
                total += os.stat(self.dir / name).st_size
        return total
