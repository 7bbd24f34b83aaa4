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
  (:meth:`scratchfs.tiers.Dataset.swap`), in :mod:`mountd.mover`;
* the control socket.

Invariant: ``Managed`` records and the namespace are only changed on the trio thread, between
awaits; worker threads get plain values and return plain values.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from scratchfs import metrics
from scratchfs.copier import Identity
from scratchfs.errors import ScratchfsError
from scratchfs.image.manifest import read_manifest
from scratchfs.namespace import Namespace
from scratchfs.policy import (
    Decision,
    Demand,
    PolicyParams,
    choose,
    demand_from_snapshot,
    gives_way,
)
from scratchfs.squashfs import Image, SquashfsError
from scratchfs.stats import CACHE, SCRATCH, ThroughputStats
from scratchfs.tiers import Dataset
from scratchfs.units import format_size

from . import requests
from .cachestore import CacheStore
from .config import FIELD_OF
from .control import ControlServer, Peer
from .mover import Mover
from .recorder import TraceRecorder
from .records import Managed, Reclaimable, Settings
from .watcher import Seen, scan

log = logging.getLogger(__name__)

PROGRESS_EVERY = 30.0  # seconds between log lines about a running copy

def _shown(value: object) -> str:
    """A setting as a log line shows it."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return "default" if value is None else str(value)


class Daemon(Mover):
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

    async def reload(self) -> None:
        if self._reload_fn is None:
            return
        try:
            new = await trio.to_thread.run_sync(self._reload_fn)
        except ScratchfsError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise
        for key in self.s.restart_needed(new):
            name = FIELD_OF.get(key, key)
            log.warning("reload: %s changes need a restart; keeping %s", key, _shown(getattr(self.s, name)))
            new = replace(new, **{n: getattr(self.s, n) for n in {key, name} if hasattr(self.s, n)})
        self.s = new
        log.info("configuration reloaded")
        self._wake_policy.set()

    # ================================================================== datasets
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
        self._trace = TraceRecorder(path, now, self._sizes(), self._logical_sizes(), self.s.sample_interval)

    def _flush_trace(self, now: float) -> None:
        if self._trace is not None and not self._trace.flush(now, self._sizes(), self._logical_sizes()):
            self._trace = None

    def pins(self) -> set[str]:
        return (set(self.s.pinned) | self.ctl_pins) - self.ctl_unpins

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
        params = PolicyParams.for_window(self.s.window, min_residency=self.s.min_residency, copy_bandwidth=self.s.copy_bandwidth)
        recopied = {n: m.recopied for n, m in self.managed.items() if m.recopied}
        # A round over many datasets can take tens of milliseconds: computed in a worker thread
        # so that FUSE requests are served meanwhile (the inputs are this round's own copies).
        d = await trio.to_thread.run_sync(functools.partial(
            choose, demand=demand, sizes=sizes, capacity=self.capacity_now, cached=cached, reclaimable=kept,
            free=max(0, free + self.reclaimable_bytes()), recopied=recopied,
            pinned=forced, never_cache=self.s.never_cache, now=now, params=params))  # fmt: skip
        self.last_decision = d
        pinned_now = self.pins() - forced  # pinned by an admin meanwhile: not demoted for this round
        for name in sorted(d.demote):
            m = self.managed.get(name)
            if m is None or name in pinned_now:
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
