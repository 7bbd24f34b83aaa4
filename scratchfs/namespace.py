"""What a mount shows: one dataset as the whole tree, or many datasets as top-level directories.

Plain objects, no FUSE. Each dataset gets a *slot* that prefixes its FUSE inode numbers; slots
are never reused during a mount, so a dataset replaced by a different image (a new Dataset in a
new slot) can never be confused by the kernel with the old one. Switching tiers of the same
content keeps the Dataset (and its slot): see tiers.Dataset.swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .squashfs import Image
from .tiers import Dataset

log = logging.getLogger(__name__)


class Namespace:
    """Datasets by name. ``single`` namespaces hold exactly one dataset shown as the root."""

    def __init__(self, *, single: bool = False, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        self.single = single
        self.uid, self.gid, self.mode = uid, gid, mode
        self._by_name: dict[str, Dataset] = {}
        self._next_slot = 0 if single else 1
        self._lock = threading.Lock()
        self.mtime = int(time.time())
        self.listeners: list[Callable[[str, Dataset | None, Dataset | None], None]] = []

    @classmethod
    def of_image(cls, name: str, image: Image, tier: str = "scratch") -> Namespace:
        ns = cls(single=True)
        ns.add(name, image, tier)
        return ns

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Dataset | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def datasets(self) -> list[Dataset]:
        return [self._by_name[n] for n in self.names()]

    @property
    def only(self) -> Dataset:
        assert self.single and self._by_name, "not a single-dataset namespace"
        return next(iter(self._by_name.values()))

    def add(self, name: str, image: Image, tier: str = "scratch") -> Dataset:
        """Add (or replace, in a new slot) the dataset *name*."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid dataset name {name!r}")
        with self._lock:
            if self.single and self._by_name and name not in self._by_name:
                raise ValueError("a single-dataset namespace holds one dataset")
            old = self._by_name.get(name)
            ds = Dataset(name, image, tier=tier, slot=self._next_slot)
            self._next_slot += 1
            self._by_name[name] = ds
            self.mtime = int(time.time())
        self._notify(name, old, ds)
        return ds

    def remove(self, name: str) -> Dataset | None:
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is not None:
                self.mtime = int(time.time())
        if old is not None:
            self._notify(name, old, None)
        return old

    def _notify(self, name: str, old: Dataset | None, new: Dataset | None) -> None:
        for cb in list(self.listeners):
            try:
                cb(name, old, new)
            except Exception:
                log.exception("namespace listener failed for %s", name)
