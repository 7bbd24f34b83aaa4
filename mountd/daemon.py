"""The mountd daemon: every dataset of the data directories under one FUSE mount, hot ones
promoted to the local cache.

One root trio nursery runs these services (all on the trio thread, cheap, never blocking;
file system work goes to worker threads):

* the FUSE loop (:func:`scratchfs.fuse_ops.serve`);
* the image watcher: data directories scanned every ``scan_interval``; new images appear,
  removed ones disappear (unless served from the cache: then the dataset stays and its
  backing is reported gone), replaced ones (size, mtime or superblock changed) are served
  from the next open in a new namespace slot and their stale cache copy dropped;
* the stats sampler: trace recording, metrics file;
* the policy loop: :func:`scratchfs.policy.choose` every ``policy_interval``, then copies
  started (one at a time) and demotions done;
* copies (:func:`scratchfs.copier.copy_image` in a worker thread) and switches
  (:meth:`scratchfs.tiers.Dataset.swap`);
* the control socket.

Invariant: ``Managed`` records and the namespace are only changed on the trio thread, between
awaits; worker threads get plain values and return plain values.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from scratchfs import metrics
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
from scratchfs.image.manifest import read_manifest
from scratchfs.namespace import Namespace
from scratchfs.policy import (
    HORIZON_WINDOWS,
    Decision,
    Demand,
    PolicyParams,
    choose,
    demand_from_snapshot,
    gives_way,
)
from scratchfs.squashfs import Image, Inode, SquashfsError
from scratchfs.stats import CACHE, SCRATCH, ThroughputStats
from scratchfs.tiers import WARM_BYTES, Dataset, warm_copy
from scratchfs.units import format_size

from . import requests
from .cachestore import CachedCopy, CacheStore
from .config import RESTART_KEYS, Share
from .control import ControlServer, Peer
from .recorder import TraceRecorder
from .watcher import Seen, scan

log = logging.getLogger(__name__)

RETRY_BASE = 5.0  # seconds before the first retry of a failed copy; doubles up to RETRY_MAX
RETRY_MAX = 600.0
#: While kept copies remain, a copy asks for room again after writing this many bytes.
ROOM_STEP = 64 << 20
PROGRESS_EVERY = 30.0  # seconds between log lines about a running copy
WARM_PASSES = 3  # a demotion warms the backing image at most this many times (see Daemon._warm)

#: Config key → Settings field, where they differ.
_SETTING_OF = {"datadir": "datadirs", "control_group": "control_gid"}


def _shown(value: object) -> str:
    """A setting as a log line shows it."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return "default" if value is None else str(value)


@dataclass(frozen=True)
class Settings:
    """What the daemon runs with (built from the configuration file and the flags)."""

    datadirs: tuple[Path, ...]
    cachedir: Path
    mountdir: Path
    capacity: Share = Share(percent=80.0)
    reserve: Share = Share(nbytes=0)
    window: float = 600.0
    min_residency: float = 0.0
    copy_bandwidth: float = 0.0  # bytes/s, 0 = unlimited
    pinned: frozenset[str] = frozenset()
    never_cache: frozenset[str] = frozenset()
    allow_other: bool = False
    control_socket: Path = Path("/run/scratchfs/mountd.sock")
    control_gid: int | None = None
    metrics_file: Path | None = None
    block_cache: int = 64 << 20  # bytes of decoded blocks per image
    threads: int | None = None
    scan_interval: float = 2.0
    policy_interval: float = 2.0
    sample_interval: float = 1.0
    max_copies: int = 1
    debug: bool = False


@dataclass
class CopyJob:
    progress: Progress
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  # trio time
    why: str = "policy"
    logged: float = 0.0  # trio time of the last progress log line
    keep_partial: bool = True  # cancelled, what it copied stays to go on from (not when evicted)


@dataclass(frozen=True)
class Reclaimable:
    """The copy of a demoted dataset, or the temp file of a cancelled copy (``partial``), left
    on the SSD until its space is needed."""

    file: str
    checksum: str  # "" for a partial copy
    identity: Identity  # of the backing image it is a copy of
    stat: tuple[int, int]  # (size, mtime_ns) of the file when it was left
    partial: Partial | None = None  # a cancelled copy, to go on from (see copy_image)


@dataclass
class Managed:
    """mountd's view of one dataset."""

    name: str
    ds: Dataset
    backing: Path | None
    identity: Identity | None  # of the backing image served
    size: int
    cache_file: str | None = None  # copy in use (tier cache)
    checksum: str | None = None
    backing_gone: bool = False
    promoted_at: float | None = None  # trio time of the promotion decision (policy input)
    last_promotion: float | None = None  # wall clock
    last_demotion: float | None = None
    job: CopyJob | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None
    adopting: bool = False
    prefetch: bool = False  # asked for by `ctl prefetch`: copied (and retried) regardless of demand
    logical: int = 0  # bytes of the files in the image, from its manifest (0: unknown)


class Daemon:
    def __init__(self, settings: Settings, *, reload: Callable[[], Settings] | None = None,
                 record_trace: str | None = None, on_ready: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.s = settings
        self._reload_fn = reload
        self._record_trace = record_trace
        self._on_ready = on_ready
        self.ns = Namespace(mode=0o755)
        self.store = CacheStore(settings.cachedir)
        self.stats = ThroughputStats(settings.window, start=0.0)
        self.managed: dict[str, Managed] = {}
        self.clashes: dict[str, list[Path]] = {}
        self._bad_images: dict[Path, Identity | None] = {}  # images that failed to open, as seen
        self.ctl_pins: set[str] = set()
        self.ctl_unpins: set[str] = set()
        self.evicted_at: dict[str, float] = {}
        self.given_way_to: str | None = None  # a copy was cancelled for this one: it starts next
        self._graveyard: list[tuple[Dataset, list[str], bool]] = []  # (dataset, files, idle last pass)
        self._to_delete: list[str] = []
        # Copies of demoted datasets, by dataset, oldest demotion first: deleted only when their
        # space is needed (make_room), served again at once if wanted before that (revive).
        self.reclaimable: dict[str, Reclaimable] = {}
        self._demoted: list[tuple[Managed, str, str]] = []  # (dataset, file, checksum) gone idle
        self._room_lock = trio.Lock()
        self._save_lock = trio.Lock()
        self._wake_policy = trio.Event()
        self._last_scratch_read: dict[str, float] = {}  # trio time of each dataset's last scratch read
        self._nursery: trio.Nursery | None = None
        self._ops: Any = None
        self.last_decision: Decision | None = None
        self.free_now = 0
        self.capacity_now = 0
        self._trace: TraceRecorder | None = None
        self.started_wall = time.time()
        self.live = False

    # ================================================================== running
    async def run(self) -> None:
        from scratchfs.fuse_ops import Operations, mount_options, serve

        s = self.s
        self.stats = ThroughputStats(s.window, start=trio.current_time())
        await trio.to_thread.run_sync(self._prepare_cache)
        await self._scan_once()
        ops = Operations(self.ns, workers=s.threads)
        self._ops = ops
        opts = mount_options(f"scratchfs-mountd:{s.mountdir}", allow_other=s.allow_other, debug=s.debug)
        if self._record_trace:
            self._start_trace(self._record_trace, trio.current_time())
        ready = trio.Event()

        def on_ready() -> None:  # worker thread, once a stat through the mount succeeded
            _raise_readahead(str(s.mountdir))
            ready_token.run_sync_soon(ready.set)

        ready_token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(ControlServer(s.control_socket, self.handle_request).run)

                async def fuse() -> None:
                    try:
                        # Eager request wait off by default: measured once with it on,
                        # bench_mountd's median gap spanning a promotion was 17.3 / 31.4 ms
                        # (unthrottled / throttled scratch) against 5.8 / 5.0 ms off. One
                        # noisy run each, so not settled (SCRATCHFS_SPIN_US turns it on).
                        await serve(ops, str(s.mountdir), opts, on_ready, on_hup=self._on_hup, spin_us=-1)
                    finally:
                        self.live = False
                        self._cancel_all_copies()
                        nursery.cancel_scope.cancel()

                nursery.start_soon(fuse)
                await ready.wait()
                self.live = True
                log.info("serving %d datasets on %s", len(self.managed), s.mountdir)
                if self._on_ready is not None:
                    self._on_ready()
                nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._sample_loop)
                nursery.start_soon(self._policy_loop)
                nursery.start_soon(self._adopt_all)
        finally:
            self._cancel_all_copies()
            for name in [n for n, r in self.reclaimable.items() if r.partial is not None]:
                self.store.delete(self.reclaimable.pop(name).file)  # cannot be gone on from after a restart
            with trio.CancelScope(shield=True):
                await self._save()
            if self._trace is not None:
                self._trace.close(trio.current_time(), self._sizes(), self._logical_sizes())

    def _on_hup(self) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._reload_on_signal)

    async def _reload_on_signal(self) -> None:
        with contextlib.suppress(ScratchfsError):  # logged by reload(); the old settings stay
            await self.reload()

    def _cancel_all_copies(self) -> None:
        for m in self.managed.values():
            if m.job is not None:
                m.job.cancel.set()

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

    async def reload(self) -> None:
        if self._reload_fn is None:
            return
        try:
            new = await trio.to_thread.run_sync(self._reload_fn)
        except ScratchfsError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise
        for key in sorted(RESTART_KEYS):
            name = _SETTING_OF.get(key, key)
            if getattr(new, name) != getattr(self.s, name):
                log.warning("reload: %s changes need a restart; keeping %s", key, _shown(getattr(self.s, name)))
                new = replace(new, **{name: getattr(self.s, name)})
        self.s = new
        log.info("configuration reloaded")
        self._wake_policy.set()

    # ================================================================== datasets
    def _open_image(self, path: Path) -> Image:
        return Image.open(path, cache_size=self.s.block_cache)

    def _add(self, name: str, img: Image, tier: str, **kw: Any) -> Managed:
        ds = self.ns.add(name, img, tier)
        ds.on_read = self._on_read
        m = Managed(name=name, ds=ds, size=kw.pop("size"), **kw)
        m.logical = _logical_bytes(m.backing)
        self.managed[name] = m
        return m

    def _on_read(self, ds: Dataset, tier: str, nbytes: int) -> None:
        # Called on the trio thread by every read the FUSE layer serves: keep it O(1).
        now = trio.current_time()
        self.stats.record(ds.name, tier, nbytes, now)
        if tier == SCRATCH:
            # A dataset that starts being read from scratch is looked at now, not up to a
            # policy interval later: short runs are over before a late copy would be done.
            last = self._last_scratch_read.get(ds.name)
            self._last_scratch_read[ds.name] = now
            if last is None or now - last > self.s.policy_interval:
                self._wake_policy.set()
        if self._trace is not None:
            self._trace.count(ds.name, nbytes)

    def retire(self, ds: Dataset, files: list[str]) -> None:
        """Close *ds* and delete *files* once no open file uses *ds* (see _reap)."""
        self._graveyard.append((ds, files, False))

    def _reap(self) -> None:
        """Close retired datasets no open file uses any more, and delete their files.

        A dataset is closed on the second pass that finds it without open files: readahead
        work queued by its last reads (which holds the image through Dataset.acquire) has
        finished by then, a scan interval later.
        """
        keep = []
        for ds, files, idle in self._graveyard:
            if self._ops is not None and self._ops.open_handles(ds) > 0:
                keep.append((ds, files, False))
            elif not idle:
                keep.append((ds, files, True))
            else:
                ds.image.close()
                self._to_delete.extend(files)
        self._graveyard = keep

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

    async def _scan_once(self) -> None:
        seen, clashes = await trio.to_thread.run_sync(scan, list(self.s.datadirs))
        for name, paths in clashes.items():
            if self.clashes.get(name) != paths:
                log.error("refusing dataset %s: images %s map to the same name; rename one",
                          name, ", ".join(str(p) for p in paths))  # fmt: skip
        self.clashes = clashes
        for name, m in list(self.managed.items()):
            if name not in seen:
                await self._backing_missing(m)
        for name, sn in seen.items():
            await self._seen(name, sn)

    async def _backing_missing(self, m: Managed) -> None:
        if m.ds.tier == CACHE and m.cache_file is not None:
            if not m.backing_gone:
                log.warning("backing image of %s (%s) is gone; serving it from the cached copy", m.name, m.backing)
                m.backing_gone = True
            return
        if self.has_kept_copy(m.name) and m.job is None and await self.revive(m):
            log.warning("backing image of %s (%s) is gone; serving it from its kept copy", m.name, m.backing)
            m.backing_gone = True
            return
        log.info("dataset %s removed (%s is gone)", m.name, m.backing)
        self.drop_reclaimable(m.name)
        if m.job is not None:
            m.job.cancel.set()
        self.ns.remove(m.name)
        del self.managed[m.name]
        self.stats.forget(m.name)
        self._last_scratch_read.pop(m.name, None)
        self.retire(m.ds, [])

    async def _seen(self, name: str, sn: Seen) -> None:
        m = self.managed.get(name)
        if sn.identity is None:
            return  # unreadable right now: keep what we have, try again next scan
        if m is not None and m.identity == sn.identity:
            if m.backing_gone or m.backing != sn.path:
                if m.backing_gone:
                    log.info("backing image of %s is back at %s", name, sn.path)
                m.backing, m.backing_gone = sn.path, False
            return
        if self._bad_images.get(sn.path) == sn.identity:
            return  # failed to open as it is; wait until it changes
        try:
            img = await trio.to_thread.run_sync(self._open_image, sn.path)
        except (SquashfsError, OSError) as e:
            self._bad_images[sn.path] = sn.identity
            log.warning("not serving %s: %s", sn.path, e)
            return
        self._bad_images.pop(sn.path, None)
        if name in self.managed and self.managed.get(name) is not m:
            img.close()  # changed while we were opening it
            return
        if m is None:
            self._add(name, img, SCRATCH, backing=sn.path, identity=sn.identity, size=sn.identity.size)
            log.info("dataset %s added from %s", name, sn.path)
            return
        # The backing image was replaced by a different one.
        log.warning("backing image of %s changed (%s); serving the new one from the next open", name, sn.path)
        if m.job is not None:
            m.job.cancel.set()
        self.drop_reclaimable(name)
        stale = [m.cache_file] if m.cache_file else []
        new = self._add(name, img, SCRATCH, backing=sn.path, identity=sn.identity, size=sn.identity.size)
        new.failures = 0
        self.retire(m.ds, stale)

    # ================================================================== loops
    async def _watch_loop(self) -> None:
        while True:
            await trio.sleep(self.s.scan_interval)
            try:
                await self._scan_once()
                self._reap()
                self._keep_demoted()
                await self._delete_pending()
            except Exception:
                log.exception("image scan failed; retrying")

    async def _sample_loop(self) -> None:
        last_metrics = -math.inf
        while True:
            await trio.sleep(self.s.sample_interval)
            now = trio.current_time()
            self._flush_trace(now)
            self._log_copy_progress(now)
            if self.s.metrics_file is not None and now - last_metrics >= max(self.s.sample_interval, 1.0):
                last_metrics = now
                try:
                    await trio.to_thread.run_sync(metrics.write, str(self.s.metrics_file), self.status())
                except (OSError, ScratchfsError) as e:
                    log.warning("cannot write metrics to %s: %s", self.s.metrics_file, e)

    def _log_copy_progress(self, now: float) -> None:
        """A log line per running copy every PROGRESS_EVERY seconds (status shows it live)."""
        for m in self.managed.values():
            job = m.job
            if job is None or now - job.logged < PROGRESS_EVERY:
                continue
            job.logged = now
            p = job.progress.as_dict()
            log.info("copy of %s: %s %.0f%% of %s, %s/s", m.name, p["phase"], p["fraction"] * 100,
                     format_size(p["bytes_total"]), format_size(p["rate"]))  # fmt: skip

    async def _policy_loop(self) -> None:
        while True:
            with trio.move_on_after(self.s.policy_interval):
                await self._wake_policy.wait()
            self._wake_policy = trio.Event()
            try:
                await self.policy_round()
            except Exception:
                log.exception("policy round failed")

    def _sizes(self) -> dict[str, int]:
        return {n: m.size for n, m in self.managed.items()}

    def _logical_sizes(self) -> dict[str, int]:
        """Bytes of each dataset's files, where its manifest tells it."""
        return {n: m.logical for n, m in self.managed.items() if m.logical}

    def _start_trace(self, path: str, now: float) -> None:
        self._trace = TraceRecorder(path, now, self._sizes(), self._logical_sizes())

    def _flush_trace(self, now: float) -> None:
        if self._trace is not None and not self._trace.flush(now, self._sizes(), self._logical_sizes()):
            self._trace = None

    def pins(self) -> set[str]:
        return (set(self.s.pinned) | self.ctl_pins) - self.ctl_unpins

    def _measure_cache(self) -> tuple[int, int]:
        """The capacity, and the free bytes of the cache filesystem beyond the reserve
        (negative when something filled the reserve)."""
        st = os.statvfs(self.s.cachedir)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize - self.s.reserve.resolve(total)
        return self.s.capacity.resolve(total), free

    async def policy_round(self) -> Decision:
        now = trio.current_time()
        snap = self.stats.snapshot(now)
        # The read path counts decompressed bytes served; copies and the cache cost image
        # bytes: scale by each image's compression ratio where its manifest tells it.
        demand = demand_from_snapshot(snap, {n: m.size / m.logical for n, m in self.managed.items() if m.logical})
        await self.make_room(0)  # the disk filled up or the capacity shrank: kept copies go first
        self.capacity_now, free = self._measure_cache()
        self.free_now = max(0, free)
        for name in [n for n in self.reclaimable if n in self.s.never_cache]:
            self.drop_reclaimable(name)  # never to be cached again: its copy is of no use
        kept = {n for n in self.managed if self.has_kept_copy(n)}
        sizes = {n: m.size for n, m in self.managed.items() if not m.adopting}
        cached = {
            n: (m.promoted_at if m.promoted_at is not None else now)
            for n, m in self.managed.items()
            if m.cache_file is not None or m.job is not None
        }
        # Datasets whose backing is gone can only be served from the cache: hold them like pins.
        forced = self.pins() | {n for n, m in self.managed.items() if m.backing_gone}
        params = PolicyParams(
            horizon=HORIZON_WINDOWS * self.s.window, min_residency=self.s.min_residency, copy_bandwidth=self.s.copy_bandwidth
        )
        d = choose(demand=demand, sizes=sizes, capacity=self.capacity_now, cached=cached, reclaimable=kept,
                   free=max(0, free + self.reclaimable_bytes()),
                   pinned=forced, never_cache=self.s.never_cache, now=now, params=params)  # fmt: skip
        self.last_decision = d
        for name in sorted(d.demote):
            m = self.managed.get(name)
            if m is None:
                continue
            if m.job is not None:
                log.info("cancelling the copy of %s (no longer wanted)", name)
                m.job.cancel.set()
            elif m.cache_file is not None:
                await self.demote(m, why=d.reasons.get(name, "policy"))
        # Wanted again while its copy is still on the SSD: served from it at once, nothing copied.
        for name in d.queue:
            if (m := self.managed.get(name)) is not None and self.has_kept_copy(name) and m.job is None:
                await self.revive(m)
        running = sum(1 for m in self.managed.values() if m.job is not None)
        # Prefetches asked for by an admin first, then the policy's promotions in its order.
        prefetch = sorted(n for n, m in self.managed.items() if m.prefetch and m.cache_file is None)
        waiting = [m for n in (*prefetch, *d.queue) if (m := self.managed.get(n)) is not None and self._may_start(m, now)]
        # A copy cancelled for another starts again only after that one (the cancelled copy may
        # rank first again in the policy's order, which is not the order of step 8).
        if self.given_way_to not in {m.name for m in waiting}:
            self.given_way_to = None
        waiting.sort(key=lambda m: (not m.prefetch, m.name != self.given_way_to))
        if waiting and running >= self.s.max_copies and not waiting[0].prefetch:
            self._give_way(d, demand, waiting[0])
        for m in waiting:
            if running >= self.s.max_copies:
                break
            self.start_copy(m, why=d.reasons.get(m.name, "policy"))
            running += 1
            if m.name == self.given_way_to:
                self.given_way_to = None
        return d

    def _may_start(self, m: Managed, now: float) -> bool:
        """Whether a copy of *m* may start now: none running or done, not backing off after a
        failure, not evicted by an admin within the window (unless asked for again)."""
        if m.job is not None or m.cache_file is not None or now < m.retry_at:
            return False
        return m.prefetch or now - self.evicted_at.get(m.name, -math.inf) >= self.s.window

    def _give_way(self, d: Decision, demand: Mapping[str, Demand], first: Managed) -> None:
        """Cancel one running copy that *first* should go before (:func:`gives_way`); copies
        an admin asked for (pins, prefetches) are never cancelled."""
        for m in self.managed.values():
            job = m.job
            if job is None or job.cancel.is_set() or m.prefetch or job.why == "pinned" or job.progress.phase != "copying":
                continue
            done = job.progress.done
            if gives_way(demand.get(m.name), m.size, done, demand.get(first.name), first.size, d.expected.get(first.name, 0.0),
                         job.progress.rate()):  # fmt: skip
                log.info("cancelling the copy of %s (%s of %s done): %s is read faster and is copied first",
                         m.name, format_size(done), format_size(m.size), first.name)  # fmt: skip
                job.cancel.set()
                self.given_way_to = first.name
                return

    # ================================================================== copies and switches
    def start_copy(self, m: Managed, why: str) -> None:
        assert self._nursery is not None
        if m.backing is None or m.backing_gone:
            return
        m.job = CopyJob(Progress(m.size), started=trio.current_time(), why=why, logged=trio.current_time())
        m.promoted_at = m.job.started
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
        capacity.  Returns how many bytes fit
        without deleting more (not less than *need*: with no kept copy left, a copy that finds
        the disk full fails as it would have; no more than ``ROOM_STEP`` while kept copies
        remain)."""
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

    # ================================================================== control (see requests.py)
    async def handle_request(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await requests.handle_request(self, req, peer)

    def status(self) -> dict[str, Any]:
        return requests.status(self)

    def wake_policy(self) -> None:
        self._wake_policy.set()


def _raise_readahead(mp: str, kb: int = 1024) -> None:
    """Ask for 1 MiB read requests (root only): the FUSE bdi defaults to 128 KiB."""
    try:
        dev = os.stat(mp).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("could not raise read_ahead_kb: %s", e)


__all__ = ["Daemon", "Settings"]


def _logical_bytes(backing: Path | None) -> int:
    """Bytes of the files in an image, from the manifest beside it; 0 when unknown."""
    if backing is None:
        return 0
    try:
        man = read_manifest(backing)
    except ScratchfsError as e:
        log.debug("no usable manifest for %s: %s", backing, e)
        return 0
    return man.logical_bytes if man is not None and man.logical_bytes > 0 else 0
