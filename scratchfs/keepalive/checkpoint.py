"""Refresh checkpoints: the stored plan and the append-only journal of finished units.

Both files are sequences of framed records::

    b"KA" | version (1 byte) | pad | payload length (u32) | crc32 (u32) | payload

The crc covers the length and the payload, so every record is checked on its own. A reader
stops quietly at a torn last record (a crash in the middle of an append) and skips, with a
warning, a damaged record in the middle. Nothing here is precious: a checkpoint that cannot be
used is discarded with a warning and the dataset is planned afresh — redoing a refresh is
harmless, losing finished work only costs time.

The plan (written once, atomically, through ``scratchfs.state.atomic_open``):
  header ``H`` + JSON, then unit records ``U`` + unit id (u64) + entry count (u32) + zlib of
  NUL-separated ``reldir, count, name…`` groups, then an end record ``E`` + JSON.
The journal: a header record (JSON with the plan id), then one JSON record per finished unit,
appended with ``O_APPEND`` and fsync'd in batches; O(1) work per unit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..state import atomic_open, sync_dir

log = logging.getLogger(__name__)

MAGIC = b"KA"
VERSION = 1
_HDR = struct.Struct("<2sBxII")
_UNIT = struct.Struct("<QI")
PLAN_NAME = "plan"
JOURNAL_NAME = "journal"

Group = tuple[bytes, list[bytes]]  # (directory relative to the base, names in it)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (caller warns and starts afresh)."""


def frame(payload: bytes) -> bytes:
    hdr_len = struct.pack("<I", len(payload))
    crc = zlib.crc32(payload, zlib.crc32(hdr_len))
    return _HDR.pack(MAGIC, VERSION, len(payload), crc) + payload


@dataclass
class ScanResult:
    """What a scan of a framed file found: where valid data ends and what was dropped."""

    end: int = 0  # offset just past the last valid record
    torn: bool = False  # an incomplete or corrupt last record was ignored
    damaged: int = 0  # corrupt records skipped in the middle
    stopped: bool = False  # unreadable framing before the end: the rest was ignored


def read_records(f: IO[bytes], result: ScanResult, want_payload: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) of valid records; fill *result*. Payload is b"" if not wanted."""
    size = f.seek(0, os.SEEK_END)
    off = 0
    f.seek(0)
    while off < size:
        hdr = f.read(_HDR.size)
        if len(hdr) < _HDR.size:
            result.torn = True
            break
        magic, version, length, crc = _HDR.unpack(hdr)
        if magic != MAGIC or version != VERSION:
            result.stopped = True
            break
        nxt = off + _HDR.size + length
        if nxt > size:
            result.torn = True
            break
        payload = f.read(length)
        if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
            if nxt >= size:
                result.torn = True
                break
            result.damaged += 1
            off = nxt
            continue
        result.end = nxt
        yield off, (payload if want_payload else b"")
        off = nxt


# -- units ---------------------------------------------------------------------------------------

def encode_unit(uid: int, groups: list[Group]) -> bytes:
    tokens: list[bytes] = []
    n = 0
    for reldir, names in groups:
        tokens.append(reldir)
        tokens.append(str(len(names)).encode())
        tokens.extend(names)
        n += len(names)
    return b"U" + _UNIT.pack(uid, n) + zlib.compress(b"\0".join(tokens), 1)


def decode_unit(payload: bytes) -> tuple[int, int, list[Group]]:
    uid, n = _UNIT.unpack_from(payload, 1)
    tokens = zlib.decompress(payload[1 + _UNIT.size:]).split(b"\0")
    groups: list[Group] = []
    i = 0
    while i < len(tokens):
        reldir, count = tokens[i], int(tokens[i + 1])
        groups.append((reldir, tokens[i + 2:i + 2 + count]))
        i += 2 + count
    if sum(len(g[1]) for g in groups) != n:
        raise CheckpointError(f"unit {uid}: entry count mismatch")
    return uid, n, groups


# -- plan ----------------------------------------------------------------------------------------

@dataclass
class PlanInfo:
    header: dict[str, Any]
    units: int
    entries: int
    unit_sizes: list[int] = field(default_factory=list)  # entries per unit, by unit id

    @property
    def plan_id(self) -> str:
        return str(self.header["id"])


def write_plan(path: Path, header: dict[str, Any], units: Iterable[list[Group]]) -> PlanInfo:
    """Write the whole plan atomically; units are numbered 0… in the order given."""
    n_units = n_entries = 0
    sizes: list[int] = []
    with atomic_open(path, "wb", 0o600) as f:
        f.write(frame(b"H" + json.dumps(header, sort_keys=True).encode()))
        for groups in units:
            rec = encode_unit(n_units, groups)
            f.write(frame(rec))
            k = sum(len(g[1]) for g in groups)
            sizes.append(k)
            n_entries += k
            n_units += 1
        f.write(frame(b"E" + json.dumps({"units": n_units, "entries": n_entries}).encode()))
    return PlanInfo(header, n_units, n_entries, sizes)


def read_plan_info(path: Path) -> PlanInfo:
    """Validate a stored plan (every record's crc, unit numbering, end record)."""
    res = ScanResult()
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    sizes: list[int] = []
    try:
        with open(path, "rb") as f:
            for _off, payload in read_records(f, res):
                kind = payload[:1]
                if kind == b"H" and header is None:
                    header = json.loads(payload[1:])
                elif kind == b"U" and header is not None and end is None:
                    uid, n = _UNIT.unpack_from(payload, 1)
                    if uid != len(sizes):
                        raise CheckpointError(f"unit {uid} out of order")
                    sizes.append(n)
                elif kind == b"E" and header is not None:
                    end = json.loads(payload[1:])
                else:
                    raise CheckpointError("unexpected record")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"unreadable plan: {e}") from None
    if res.torn or res.damaged or res.stopped or header is None or end is None:
        raise CheckpointError("plan is incomplete or damaged")
    if end.get("units") != len(sizes) or end.get("entries") != sum(sizes) or header.get("v") != VERSION:
        raise CheckpointError("plan end record does not match its units")
    return PlanInfo(header, len(sizes), sum(sizes), sizes)


def iter_plan_units(path: Path, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[int, int, list[Group]]]:
    """Yield (unit id, entries, groups) of the units not in *skip*, in plan order."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            hdr = f.read(_HDR.size)
            if len(hdr) < _HDR.size:
                break
            _m, _v, length, crc = _HDR.unpack(hdr)
            head = f.read(1 + _UNIT.size)
            if head[:1] == b"U":
                uid, _n = _UNIT.unpack_from(head, 1)
                if uid not in skip:
                    rest = f.read(length - len(head))
                    payload = head + rest
                    if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
                        raise CheckpointError(f"plan unit {uid} damaged")
                    yield decode_unit(payload)
            off += _HDR.size + length
            f.seek(off)


def iter_plan_unit_refs(path: Path, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[int, int, int, int]]:
    """Yield (unit id, entries, offset, length) of the unit records not in *skip*, reading only headers."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            hdr = f.read(_HDR.size)
            if len(hdr) < _HDR.size:
                break
            _m, _v, length, _crc = _HDR.unpack(hdr)
            head = f.read(1 + _UNIT.size)
            if head[:1] == b"U":
                uid, n = _UNIT.unpack_from(head, 1)
                if uid not in skip:
                    yield uid, n, off, _HDR.size + length
            off += _HDR.size + length
            f.seek(off)


def read_unit_at(fd: int, offset: int, length: int) -> tuple[int, int, list[Group]]:
    """Read, check and decode one unit record of a plan file open as *fd*."""
    raw = os.pread(fd, length, offset)
    if len(raw) != length:
        raise CheckpointError("plan truncated")
    _m, _v, plen, crc = _HDR.unpack_from(raw)
    payload = raw[_HDR.size:]
    if len(payload) != plen or zlib.crc32(payload, zlib.crc32(struct.pack("<I", plen))) != crc:
        raise CheckpointError(f"plan record at {offset} damaged")
    return decode_unit(payload)


# -- journal -------------------------------------------------------------------------------------

@dataclass
class JournalState:
    plan_id: str | None = None
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    scan: ScanResult = field(default_factory=ScanResult)


def read_journal(path: Path) -> JournalState:
    """Parse a journal; a torn last record is ignored, damaged ones are skipped."""
    st = JournalState()
    with open(path, "rb") as f:
        for _off, payload in read_records(f, st.scan):
            try:
                rec = json.loads(payload)
            except ValueError:
                st.scan.damaged += 1
                continue
            if st.plan_id is None:
                if rec.get("kind") != "journal" or rec.get("v") != VERSION:
                    raise CheckpointError("journal header missing")
                st.plan_id = str(rec["plan"])
            elif isinstance(rec.get("u"), int):
                st.done[rec["u"]] = rec
    if st.plan_id is None:
        raise CheckpointError("journal header missing")
    return st


class Journal:
    """Appender: ``append(record)`` is one write(); ``sync()`` fsyncs the batch."""

    def __init__(self, path: Path, plan_id: str, truncate_to: int | None = None, sync_every: int = 64,
                 sync_interval: float = 1.0) -> None:
        self.path = path
        new = truncate_to is None
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if new else 0)
        self.fd = os.open(path, flags, 0o600)
        if not new and truncate_to is not None and os.fstat(self.fd).st_size != truncate_to:
            os.ftruncate(self.fd, truncate_to)  # drop a torn tail before appending after it
        self.sync_every = sync_every
        self.sync_interval = sync_interval
        self.pending = 0
        self.last_sync = time.monotonic()
        if new:
            self._write({"kind": "journal", "v": VERSION, "plan": plan_id})
            os.fsync(self.fd)
            sync_dir(path.parent)

    def _write(self, rec: dict[str, Any]) -> None:
        os.write(self.fd, frame(json.dumps(rec, separators=(",", ":")).encode()))

    def append(self, rec: dict[str, Any]) -> None:
        self._write(rec)
        self.pending += 1
        if self.pending >= self.sync_every or time.monotonic() - self.last_sync >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        if self.pending:
            os.fsync(self.fd)
            self.pending = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self.fd)
            self.fd = -1


def remove_checkpoint(ddir: Path) -> None:
    """Delete plan and journal (the dataset completed or the checkpoint is unusable).

    The plan goes first: killed in between, what is left is a journal without a plan, which
    the next run discards before planning afresh. The other way round, a plan without its
    journal would be resumed as if no unit were done, and a completed run redone in full.
    """
    removed = False
    for name in (PLAN_NAME, JOURNAL_NAME):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ddir / name)
            removed = True
    if removed:
        sync_dir(ddir)


@dataclass
class CheckpointHealth:
    present: bool
    ok: bool
    message: str
    units: int = 0
    done: int = 0


def inspect_checkpoint(ddir: Path) -> CheckpointHealth:
    """For status/doctor: is there a checkpoint, is it usable, how far did it get."""
    plan_p, jour_p = ddir / PLAN_NAME, ddir / JOURNAL_NAME
    if not plan_p.exists() and not jour_p.exists():
        return CheckpointHealth(False, True, "no checkpoint")
    try:
        info = read_plan_info(plan_p)
    except FileNotFoundError:
        return CheckpointHealth(True, False, "journal without a plan")
    except CheckpointError as e:
        return CheckpointHealth(True, False, str(e))
    try:
        js = read_journal(jour_p)
    except FileNotFoundError:
        return CheckpointHealth(True, True, "planned, no unit finished", info.units, 0)
    except (CheckpointError, OSError) as e:
        return CheckpointHealth(True, False, f"journal: {e}", info.units, 0)
    if js.plan_id != info.plan_id:
        return CheckpointHealth(True, False, "journal belongs to another plan", info.units, 0)
    done = len([u for u in js.done if 0 <= u < info.units])
    note = f"{done}/{info.units} units done"
    if js.scan.torn:
        note += " (torn last record ignored)"
    if js.scan.damaged or js.scan.stopped:
        return CheckpointHealth(True, True, note + f"; {js.scan.damaged} damaged record(s) will be redone",
                                info.units, done)
    return CheckpointHealth(True, True, note, info.units, done)
