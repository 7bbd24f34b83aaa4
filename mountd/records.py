"""What mountd knows: its settings, and per dataset what it serves, its copy and its copy job."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from scratchfs.copier import Identity, Partial, Progress
from scratchfs.tiers import Dataset

from .config import Share


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
