"""The cache side of mountd: copies, switches between tiers, demotions, kept copies, adoption
at start, and the files mountd owns in the cache directory.

:class:`Mover` is a part of :class:`mountd.daemon.Daemon` (a mixin: it works on the daemon's
records, and the daemon's policy and control call it).  The daemon's invariant holds here too:
``Managed`` records are only changed on the trio thread, between awaits; worker threads get
plain values and return plain values.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from scratchfs.copier import (
    CopyCancelled,
    CopyError,
    CopyResult,
    Identity,
    Partial,
    Progress,
    copy_image,
    verify_copy,
)
from scratchfs.errors import ScratchfsError
from scratchfs.policy import copied_back
from scratchfs.squashfs import Image, Inode, SquashfsError
from scratchfs.stats import CACHE, SCRATCH
from scratchfs.tiers import WARM_BYTES, warm_copy
from scratchfs.units import format_size

from .cachestore import CachedCopy, CacheStore
from .records import CopyJob, Managed, Reclaimable

if TYPE_CHECKING:
    from .records import Settings

log = logging.getLogger(__name__)

RETRY_BASE = 5.0  # seconds before the first retry of a failed copy; doubles up to RETRY_MAX
RETRY_MAX = 600.0
#: While kept copies remain, a copy asks for room again after writing this many bytes.
ROOM_STEP = 64 << 20
WARM_PASSES = 3  # a demotion warms the backing image at most this many times (see Mover._warm)


class Mover:
    """Moving datasets between the tiers (see the module docstring)."""

    # The daemon's state this part works on (set by Daemon.__init__).
    s: Settings
    store: CacheStore
    managed: dict[str, Managed]
    clashes: dict[str, list[Path]]
    reclaimable: dict[str, Reclaimable]
    live: bool
    _nursery: trio.Nursery | None
    _ops: Any
    _to_delete: list[str]
    _demoted: list[tuple[Managed, str, str]]
    _room_lock: trio.Lock
    _save_lock: trio.Lock
    _wake_policy: trio.Event

    def _add(self, name: str, img: Image, tier: str, **kw: Any) -> Managed:
        raise NotImplementedError  # the daemon's: a dataset added to the namespace

    # ================================================================== the cache directory
    def _open_image(self, path: Path) -> Image:
        return Image.open(path, cache_size=self.s.block_cache)

    def _prepare_cache(self) -> None:
        """Blocking: load the record of our files, remove leftover temp files."""
        self.s.cachedir.mkdir(parents=True, exist_ok=True)
        self.store.load()
        self.store.remove_temps()
        for file in list(self.store.copies):
            if not (self.s.cachedir / file).exists():
                log.warning("cached copy %s is gone; forgetting it", self.s.cachedir / file)
                del self.store.copies[file]
        self.store.save()

    async def _save(self) -> None:
        doc = self.store.document()
        async with self._save_lock:
            try:
                await trio.to_thread.run_sync(self.store.write, doc)
            except (OSError, ScratchfsError) as e:
                log.error("cannot save %s: %s", self.store.path, e)

    async def _delete_pending(self) -> None:
        if not self._to_delete:
            return
        files, self._to_delete = self._to_delete, []
        for f in files:
            if any(m.cache_file == f for m in self.managed.values()):
                continue  # back in use (cannot happen today; be safe)
            await trio.to_thread.run_sync(self.store.delete, f)
            log.info("deleted cached copy %s", self.s.cachedir / f)
        await self._save()

    def _measure_cache(self) -> tuple[int, int]:
        """The capacity, and the free bytes of the cache filesystem beyond the reserve
        (negative when something filled the reserve)."""
        st = os.statvfs(self.s.cachedir)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize - self.s.reserve.resolve(total)
        return self.s.capacity.resolve(total), free

    # ================================================================== copies and switches
    def start_copy(self, m: Managed, why: str) -> None:
        assert self._nursery is not None
        if m.backing is None or m.backing_gone:
            return
        m.job = CopyJob(Progress(m.size), started=trio.current_time(), why=why, logged=trio.current_time())
        m.promoted_at = m.job.started
        if copied_back(m.demoted_at, m.job.started, self.s.window):
            m.recopied += 1
        m.demoted_at = None  # one copy back per demotion (not its retries)
        self._nursery.start_soon(self._copy, m, m.job)

    async def _copy(self, m: Managed, job: CopyJob) -> None:
        # m.job stays set until the switch is done, so no policy round starts a second copy
        # while the finished one is being opened and switched to.
        try:
            await self._copy_and_switch(m, job)
        finally:
            if m.job is job:
                m.job = None
            self._wake_policy.set()  # the copier is free: the next copy need not wait a round

    async def _copy_and_switch(self, m: Managed, job: CopyJob) -> None:
        src, ident = m.backing, m.identity
        assert src is not None and ident is not None
        final = self.store.final_path(m.name)
        kept = self.reclaimable.get(m.name)
        if kept is not None and kept.partial is not None:  # a cancelled copy to go on from
            del self.reclaimable[m.name]
            tmp, partial = self.s.cachedir / kept.file, kept.partial
        else:
            tmp, partial = self.store.new_temp(m.name), Partial()
            await self._save()
        log.info("copying %s to %s (%s)", src, final, job.why)
        result: CopyResult | None = None
        left: Reclaimable | None = None
        try:
            result = await trio.to_thread.run_sync(
                lambda: copy_image(src, tmp, final, bandwidth=self.s.copy_bandwidth, cancel=job.cancel,
                                   progress=job.progress, room=self._room_for_copy, partial=partial))  # fmt: skip
        except CopyCancelled:
            if (left := self._partial_to_keep(m, job, tmp, partial)) is not None:
                self.reclaimable[m.name] = left
                log.info("copy of %s cancelled; the %s copied stay in %s until their space is needed",
                         m.name, format_size(partial.pos), tmp)  # fmt: skip
            else:
                log.info("copy of %s cancelled", m.name)
        except CopyError as e:
            m.failures += 1
            delay = min(RETRY_MAX, RETRY_BASE * 2 ** (m.failures - 1))
            m.retry_at = trio.current_time() + delay
            m.last_error = str(e)
            log.warning("copy of %s failed (%s); serving from scratch, retrying in %.0f s", m.name, e, delay)
        finally:
            m.copied += max(job.progress.done - job.progress.resumed, 0)
            if left is None:  # gone already, unless a cancelled copy left it (of no use)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.store.delete, tmp.name)
        if result is None:
            if m.cache_file is None:
                m.promoted_at = None
            await self._save()
            return
        self.store.add(CachedCopy(final.name, m.name, str(src), result.identity, result.checksum, time.time()))
        await self._save()
        if self.managed.get(m.name) is not m or result.identity != m.identity or job.cancel.is_set():
            log.info("dropping the copy of %s: the dataset changed or the copy is no longer wanted", m.name)
            self._to_delete.append(final.name)
            await self._delete_pending()
            return
        await self._switch_to_cache(m, final.name, result.checksum)

    def _partial_to_keep(self, m: Managed, job: CopyJob, tmp: Path, partial: Partial) -> Reclaimable | None:
        """What a cancelled copy wrote, to keep if it is of use: something was copied, the
        dataset and its image are the same, it was not evicted, and mountd is not stopping."""
        if (partial.pos <= 0 or partial.identity is None or not self.live or not job.keep_partial
                or self.managed.get(m.name) is not m or m.backing_gone or partial.identity != m.identity
                or m.name in self.s.never_cache):  # fmt: skip
            return None
        try:
            st = os.stat(tmp)
        except OSError:
            return None
        return Reclaimable(tmp.name, "", partial.identity, (st.st_size, st.st_mtime_ns), partial)

    async def _switch_to_cache(self, m: Managed, file: str, checksum: str) -> None:
        try:
            img = await trio.to_thread.run_sync(self._open_image, self.s.cachedir / file)
        except (SquashfsError, OSError) as e:
            log.error("cannot open the cached copy %s: %s", file, e)
            self._to_delete.append(file)
            await self._delete_pending()
            return
        if self.managed.get(m.name) is not m:
            img.close()
            self._to_delete.append(file)
            await self._delete_pending()
            return
        previous = m.cache_file  # (None unless two copies raced; then the older one goes once idle)

        def on_idle(_old: Image) -> None:
            if previous is not None:
                self._to_delete.append(previous)

        m.ds.swap(img, CACHE, on_idle)
        m.cache_file, m.checksum = file, checksum
        m.last_promotion = time.time()
        m.failures, m.last_error, m.prefetch = 0, None, False
        if m.promoted_at is None:
            m.promoted_at = trio.current_time()
        log.info("promoted %s: now served from %s", m.name, self.s.cachedir / file)

    async def _warm(self, m: Managed, img: Image, positions: list[tuple[Inode, int]]) -> None:
        """Decode into *img* the next bytes of each file of *m* being read, before readers
        switch to it; again (up to WARM_PASSES times) for files whose reader has meanwhile
        read past half of what was warmed for it: warming from slow scratch can take longer
        than a fast reader needs to read WARM_BYTES, and a reader that overtook the warmed
        bytes would wait for cold scratch right after the switch."""
        warmed: dict[int, int] = {}  # id(inode) → end of the bytes warmed for it
        for _ in range(WARM_PASSES):
            todo = [(i, off) for i, off in positions if off + WARM_BYTES // 2 > warmed.get(id(i), -1)]
            if not todo:
                return
            await trio.to_thread.run_sync(warm_copy, img, todo)
            warmed.update((id(i), off + WARM_BYTES) for i, off in todo)
            positions = self._ops.read_positions(m.ds) if self._ops is not None else []

    async def demote(self, m: Managed, why: str = "policy", keep: bool = True) -> bool:
        """Move *m*'s readers back to its backing image.  Once no read uses the copy, it is kept
        on the SSD, reclaimable (see make_room), or with *keep* false deleted."""
        if m.cache_file is None:
            return False
        if m.backing is None or m.backing_gone:
            log.warning("cannot demote %s: its backing image is gone", m.name)
            return False
        backing, ident = m.backing, m.identity
        # Files being read go on reading from scratch: their next blocks are read there first
        # (make before break), so that they do not wait for cold scratch after the switch.
        positions = self._ops.read_positions(m.ds) if self._ops is not None else []

        def open_backing() -> Image | None:
            if Identity.of(backing) != ident:
                return None  # replaced: the watcher serves the new image in a new slot
            return self._open_image(backing)

        try:
            img = await trio.to_thread.run_sync(open_backing)
        except (SquashfsError, OSError) as e:
            log.warning("cannot demote %s: backing image unreadable: %s", m.name, e)
            return False
        if img is None:
            return False
        await self._warm(m, img, positions)
        if self.managed.get(m.name) is not m or m.cache_file is None:
            img.close()
            return False
        file, checksum = m.cache_file, m.checksum or ""

        def on_idle(_old: Image) -> None:  # any thread: settled by the watcher loop
            if keep:
                self._demoted.append((m, file, checksum))
            else:
                self._to_delete.append(file)

        m.ds.swap(img, SCRATCH, on_idle)
        m.cache_file, m.checksum, m.promoted_at = None, None, None
        m.last_demotion = time.time()
        m.demoted_at = trio.current_time() if why != "evict" else None  # an admin's eviction is no policy's mistake
        log.info("demoted %s (%s): now served from %s", m.name, why, m.backing)
        self._wake_policy.set()
        return True

    # ================================================================== reclaimable copies
    def _keep_demoted(self) -> None:
        """Copies of demoted datasets no read uses any more stay on the SSD, reclaimable, unless
        the dataset changed, went away or was copied again meanwhile."""
        while self._demoted:
            m, file, checksum = self._demoted.pop(0)
            c = self.store.copies.get(file)
            try:
                st = os.stat(self.s.cachedir / file)
            except OSError:
                st = None
            if (self.managed.get(m.name) is not m or m.cache_file is not None or m.job is not None or c is None
                    or c.identity != m.identity or st is None or m.name in self.reclaimable):  # fmt: skip
                self._to_delete.append(file)
                continue
            self.reclaimable[m.name] = Reclaimable(file, checksum, c.identity, (st.st_size, st.st_mtime_ns))
            log.info("kept the copy of %s (%s) until its space is needed", m.name, self.s.cachedir / file)

    def reclaimable_bytes(self) -> int:
        """Bytes of the kept copies and cancelled copies' temp files (of datasets still served)."""
        return sum(r.stat[0] for n, r in self.reclaimable.items() if n in self.managed)

    def has_kept_copy(self, name: str) -> bool:
        """Whether *name* has a whole copy kept, to be served from again at once."""
        r = self.reclaimable.get(name)
        return r is not None and r.partial is None

    def drop_reclaimable(self, name: str) -> None:
        """Delete the kept copy of *name*, if any (by the watcher loop)."""
        r = self.reclaimable.pop(name, None)
        if r is not None:
            self._to_delete.append(r.file)

    async def make_room(self, need: int) -> int:
        """Delete kept copies (and cancelled copies' temp files), oldest left first, until *need*
        more bytes fit in the cache: in the free space beyond the reserve and within the
        capacity.  Returns how many bytes fit without deleting more (not less than *need*: with
        no kept copy left, a copy that finds the disk full fails as it would have; no more than
        ``ROOM_STEP`` while kept copies remain)."""
        if not self.reclaimable and need == 0:
            return 0
        async with self._room_lock:
            deleted = False
            while True:
                capacity, free = self._measure_cache()
                used = await trio.to_thread.run_sync(self.store.used_bytes)
                fits = min(free, capacity - used)
                if fits >= need or not self.reclaimable:
                    break
                name = next(iter(self.reclaimable))
                r = self.reclaimable.pop(name)
                await trio.to_thread.run_sync(self.store.delete, r.file)
                log.info("deleted the %s of %s (%s): its space is needed",
                         "cancelled copy" if r.partial else "kept copy", name, self.s.cachedir / r.file)  # fmt: skip
                deleted = True
            if deleted:
                await self._save()
            # While kept copies remain, asked again every ROOM_STEP: another copy (a prefetch
            # runs beside the policy's) may be writing into the same headroom.
            return max(need, min(fits, ROOM_STEP) if self.reclaimable else fits)

    def _room_for_copy(self, need: int) -> int:
        """copy_image's *room*, in its worker thread."""
        return trio.from_thread.run(self.make_room, need)

    async def revive(self, m: Managed) -> bool:
        """Serve *m* from its kept copy again, if the copy and the dataset are as they were."""
        r = self.reclaimable.pop(m.name)
        try:
            st = os.stat(self.s.cachedir / r.file)
            same = (st.st_size, st.st_mtime_ns) == r.stat
        except OSError:
            same = False
        if not same or m.identity != r.identity or m.cache_file is not None or m.job is not None:
            log.warning("not reusing the kept copy %s of %s: it or the dataset changed", r.file, m.name)
            self._to_delete.append(r.file)
            return False
        log.info("promoting %s again from its kept copy %s (nothing to copy)", m.name, self.s.cachedir / r.file)
        m.promoted_at = trio.current_time()
        await self._switch_to_cache(m, r.file, r.checksum)
        return m.cache_file == r.file

    async def _adopt_all(self) -> None:
        """Adopt cached copies left by an earlier run: verified, and only of unchanged images."""
        for c in list(self.store.copies.values()):
            m = self.managed.get(c.dataset)
            if m is not None and m.cache_file is not None:
                continue
            if m is not None and m.identity != c.identity:
                log.info("cached copy %s is stale (its image changed); deleting it", c.file)
                self._to_delete.append(c.file)
                continue
            if m is None and c.dataset in self.clashes:
                continue
            path = self.s.cachedir / c.file
            if m is not None:
                m.adopting = True  # kept out of policy rounds until adopted or refused
            try:
                ok = await trio.to_thread.run_sync(verify_copy, path, c.checksum)
                if not ok:
                    log.warning("cached copy %s does not verify; deleting it", path)
                    self._to_delete.append(c.file)
                    continue
                await self._adopt(c, path)
            finally:
                if m is not None:
                    m.adopting = False
        await self._delete_pending()

    async def _adopt(self, c: CachedCopy, path: Path) -> None:
        """Serve a verified copy: as the cached tier of its dataset, or alone if its backing is gone."""
        m = self.managed.get(c.dataset)
        if m is None:
            if Path(c.backing).exists():
                return  # appeared meanwhile (or unreadable): left to the next scans
            try:
                img = await trio.to_thread.run_sync(self._open_image, path)
            except (SquashfsError, OSError) as e:
                log.warning("cannot open cached copy %s: %s", path, e)
                self._to_delete.append(c.file)
                return
            m = self._add(c.dataset, img, CACHE, backing=Path(c.backing), identity=c.identity,
                          size=c.identity.size, cache_file=c.file, checksum=c.checksum,
                          backing_gone=True)  # fmt: skip
            m.promoted_at = trio.current_time()
            m.last_promotion = time.time()
            log.warning("adopted %s for %s; its backing image %s is gone", c.file, c.dataset, c.backing)
            return
        if m.identity != c.identity or m.cache_file is not None or m.job is not None:
            return
        m.promoted_at = trio.current_time()
        await self._switch_to_cache(m, c.file, c.checksum)
        log.info("adopted cached copy %s for %s", c.file, c.dataset)
