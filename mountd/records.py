"""What mountd knows: its settings, and per dataset what it serves, its copy and its copy job."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scratchfs.copier import Identity, Partial, Progress
from scratchfs.tiers import Dataset

from .config import MountdConfig


@dataclass(frozen=True)
class Settings(MountdConfig):
    """What the daemon runs with: the configuration (file, then flags on top; see
    :mod:`mountd.config` for the keys and their defaults), and what only it and tests tune."""

    sample_interval: float = 1.0  # seconds between trace flushes, metrics, progress lines
    max_copies: int = 1
    debug: bool = False

    @classmethod
    def of(cls, cfg: MountdConfig, **extra: Any) -> Settings:
        """*cfg* with the settings that are not configuration keys (``extra``) on top."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **extra)


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
    demoted_at: float | None = None  # trio time of the last demotion (policy input)
    recopied: int = 0  # copies that copied it back soon after a demotion (policy input)
    job: CopyJob | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None
    adopting: bool = False
    prefetch: bool = False  # asked for by `ctl prefetch`: copied (and retried) regardless of demand
    logical: int = 0  # bytes of the files in the image, from its manifest (0: unknown)
    copied: int = 0  # bytes its copies read from scratch since mountd started (cancelled ones too)
