"""Datasets: one logical image that may live on several tiers (scratch, local SSD).

Copies on every tier are byte-identical, so inode references and block offsets are the
same on each: switching a dataset to another tier is replacing ``Dataset.image``. Open file
handles hold the Dataset, not the Image, so their next read goes to the new tier; a read
already in flight finishes on the image it started with (which is only closed once no read
uses it), unless it is waiting for blocks to be read and the switch is a promotion (to the
cache tier): then it starts over on the new, faster copy. A demotion lets such reads finish on
the cached copy: started over, they would wait for slow scratch instead. (bench_mountd, link
emulator, reader at full speed: the part of a demotion's gap after the switch was at most
28-47 ms unthrottled and 26-39 ms at 100 MiB/s before this, 6 and 18 ms after; one run each.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .squashfs import Image, Inode, SquashfsError
from .stats import CACHE

log = logging.getLogger(__name__)

# warm_copy: bytes decoded ahead for each file being read, on the copy readers switch to.
WARM_BYTES = 2 << 20


class Dataset:
    """A named image with an active tier. ``slot`` numbers it inside a namespace."""

    def __init__(self, name: str, image: Image, tier: str = "scratch", slot: int = 0) -> None:
        self.name = name
        self.image = image
        self.tier = tier
        self.slot = slot
        self._users: dict[int, int] = {}  # id(image) → reads in flight
        self._lock = threading.Lock()
        self._retired: list[tuple[Image, Callable[[Image], None] | None]] = []
        self._tier_of: dict[int, str] = {id(image): tier}
        self.on_read: Callable[[Dataset, str, int], None] | None = None
        # Called by swap() to the cache tier: reads waiting for blocks of the old image start
        # over on the new one (the FUSE layer registers them; swap() runs on the thread
        # serving FUSE).
        self.waiters: set[Callable[[], None]] = set()

    def begin(self) -> Image:
        """Take the active image for one read; pair with end()."""
        with self._lock:
            img = self.image
            self._users[id(img)] = self._users.get(id(img), 0) + 1
            return img

    def acquire(self, img: Image) -> bool:
        """Hold *img* open for background work (readahead); False if it is already closed."""
        with self._lock:
            if img is not self.image and not any(r[0] is img for r in self._retired):
                return False
            self._users[id(img)] = self._users.get(id(img), 0) + 1
            return True

    def release(self, img: Image) -> None:
        """Drop a hold taken by begin() or acquire(); a retired image closes with its last user."""
        done: list[tuple[Image, Callable[[Image], None] | None]] = []
        with self._lock:
            left = self._users[id(img)] - 1
            if left:
                self._users[id(img)] = left
            else:
                del self._users[id(img)]
                done = [r for r in self._retired if r[0] is img]
                if done:
                    self._retired = [r for r in self._retired if r[0] is not img]
                    self._tier_of.pop(id(img), None)
        for old, cb in done:
            _finish(old, cb)

    def tier_of(self, img: Image) -> str:
        """The tier *img* serves (or served, if retired) for this dataset."""
        return self._tier_of.get(id(img), self.tier)

    def end(self, img: Image, nbytes: int) -> None:
        """Finish a read begun on *img*; count its bytes for the tier that served them."""
        tier = self.tier_of(img)
        self.release(img)
        if self.on_read is not None:
            self.on_read(self, tier, nbytes)

    def swap(self, image: Image, tier: str, on_idle: Callable[[Image], None] | None = None) -> None:
        """Make *image* active; the old one is closed (then *on_idle* called) once idle."""
        with self._lock:
            old = self.image
            self.image = image
            self.tier = tier
            self._tier_of[id(image)] = tier
            busy = id(old) in self._users
            if busy:
                self._retired.append((old, on_idle))
            elif old is not image:
                self._tier_of.pop(id(old), None)
        if not busy and old is not image:
            _finish(old, on_idle)
        if old is not image and tier == CACHE:
            for wake in list(self.waiters):
                wake()


def _finish(img: Image, cb: Callable[[Image], None] | None) -> None:
    img.close()
    if cb is not None:
        cb(img)


def warm_copy(img: Image, positions: Sequence[tuple[Inode, int]], nbytes: int = WARM_BYTES) -> int:
    """Decode into *img*'s block cache the *nbytes* after each of *positions* (from
    Operations.read_positions; inodes of any copy of the same image). Blocking: run it in a
    worker thread before switching readers to *img*. Returns the bytes made ready; a block
    that fails to load is left for the read that needs it (which reports the error)."""
    done = 0
    for inode, off in positions:
        try:
            data = img.read_view(inode, off, nbytes, load=True)
        except (SquashfsError, OSError) as e:
            log.debug("warming %s at %d failed: %s", inode, off, e)
            continue
        done += len(data) if data is not None else 0
    return done
