"""Mount helpers and tree snapshots for the read-path tests.

`kernel_mount` mounts an image with the kernel's squashfs driver (`mount -t squashfs -o loop,ro`),
`scratchfs_mount` with `scratchfs mount`; both always unmount on exit (fusermount3 -u / umount,
lazily as a last resort).  `snapshot` records every path of a mounted tree (type, mode, owner,
size, nlink, mtime, rdev, symlink target, xattrs, content hash, hard-link identity) and `diff`
compares two snapshots field by field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Files larger than this are not hashed in a snapshot: `compare_large_files` reads them from two
# mounts side by side instead (same strength as a hash, a fraction of the time for 4 GiB).
LARGE_FILE = 256 * 1024 * 1024
CHUNK = 1024 * 1024


def scratchfs_command() -> list[str]:
    """The console script installed next to the running interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("scratchfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scratchfs.cli"]


def run_scratchfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(scratchfs_command() + list(args), capture_output=True, text=True, timeout=timeout)


def mounted_paths() -> dict[str, str]:
    """mountpoint → fs type, from /proc/self/mountinfo (octal escapes decoded)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            sep = parts.index(b"-")
            mp = parts[4]
            for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
                mp = mp.replace(code, bytes([int(code[1:], 8)]))
            out[os.fsdecode(mp)] = parts[sep + 1].decode()
    return out


def is_mounted(path: Path | str) -> bool:
    return os.path.abspath(path) in mounted_paths()


def wait_for(
    pred: Callable[[], Any],
    what: str,
    timeout: float = 30.0,
    detail: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> Any:
    """Poll *pred* every *interval* seconds until it returns something true, and return that;
    for what a real process (a daemon, a mount, a Slurm job) must do. Fails after *timeout*
    seconds, with *detail()* appended."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}{detail() if detail else ''}")
        time.sleep(interval)


def unmount(path: Path | str) -> None:
    """Unmount whatever is on `path`: politely, then forcefully, then lazily."""
    p = os.path.abspath(path)
    attempts = []
    if shutil.which("fusermount3"):
        attempts.append(["fusermount3", "-u", p])
    attempts += [["umount", p], ["umount", "-f", p], ["umount", "-l", p]]
    for cmd in attempts:
        if not is_mounted(p):
            return
        subprocess.run(cmd, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while is_mounted(p) and time.monotonic() < deadline:
        time.sleep(0.1)  # a lazy unmount detaches asynchronously
    if is_mounted(p):
        raise RuntimeError(f"could not unmount {p}")


@contextlib.contextmanager
def kernel_mount(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mountpoint)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@dataclass
class FuseMount:
    path: Path
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def scratchfs_mount(image: Path, mountpoint: Path, *extra: str, log: Path | None = None) -> Iterator[FuseMount]:
    """`scratchfs mount IMAGE DIR`; fails the test with the command's stderr if it refuses."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.with_name(mountpoint.name + ".log")
    res = run_scratchfs("mount", str(image), str(mountpoint), "--log", str(log), *extra)
    if res.returncode != 0:
        with contextlib.suppress(RuntimeError):
            unmount(mountpoint)
        raise AssertionError(f"scratchfs mount {image} failed ({res.returncode}): {res.stderr.strip()}")
    assert is_mounted(mountpoint), "scratchfs mount returned 0 but the mount is not live"
    try:
        yield FuseMount(mountpoint, log)
    finally:
        unmount(mountpoint)


# ------------------------------------------------------------------------------------ snapshot

@dataclass
class Entry:
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    mtime_ns: int
    rdev: int
    target: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None  # None: listxattr said ENOTSUP
    sha256: str | None = None  # "large" for files compared by compare_large_files
    ino: int = field(default=0, compare=False)
    errors: list[str] = field(default_factory=list, compare=False)  # tolerant snapshots: "what:ERRNO"

    def fields(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("ino", "errors")}


def type_name(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return name
    return f"unknown({mode:o})"


def hash_file(path: bytes, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        left = limit
        while True:
            buf = f.read(CHUNK if left is None else min(CHUNK, left))
            if not buf:
                break
            h.update(buf)
            if left is not None:
                left -= len(buf)
                if left <= 0:
                    break
    return h.hexdigest()


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def probe_one(root: bytes, rel: bytes, *, tolerant: bool = False) -> tuple[Entry, list[bytes] | None]:
    """One path's Entry and, for a directory, its sorted listing (None if it failed)."""
    full = os.path.join(root, rel) if rel else root
    try:
        st = os.lstat(full)
    except OSError as e:
        if not tolerant:
            raise
        return Entry("unknown", 0, 0, 0, 0, 0, 0, 0, errors=["lstat:" + _err(e)]), None
    ent = Entry(type_name(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_mtime_ns, st.st_rdev, ino=st.st_ino)  # fmt: skip
    listing = None
    try:
        names = os.listxattr(full, follow_symlinks=False)
        ent.xattrs = {os.fsencode(n): os.getxattr(full, n, follow_symlinks=False) for n in names}
    except OSError as e:
        if e.errno != errno.ENOTSUP:  # ENOTSUP leaves xattrs None, as for an image without xattrs
            if not tolerant:
                raise
            ent.errors.append("xattrs:" + _err(e))
    try:
        if ent.type == "symlink":
            ent.target = os.readlink(full)
        elif ent.type == "file":
            ent.sha256 = "large" if st.st_size > LARGE_FILE else hash_file(full)
        elif ent.type == "dir":
            listing = sorted(os.listdir(full))
    except OSError as e:
        if not tolerant:
            raise
        what = {"symlink": "readlink", "file": "read", "dir": "listdir"}[ent.type]
        ent.errors.append(f"{what}:{_err(e)}")
    return ent, listing


def snapshot(root: Path, *, tolerant: bool = False) -> dict[bytes, Entry]:
    """Every path under `root` (b"" for the root itself) → Entry.

    With `tolerant`, an OSError while reading a path (lstat, xattrs, content, target, listing)
    is recorded in the Entry's `errors` as "what:ERRNO" (the field it hid stays None) instead of
    raised, so damaged images can be snapshotted.
    """
    r = os.fsencode(root)
    out: dict[bytes, Entry] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        ent, listing = probe_one(r, rel, tolerant=tolerant)
        out[rel] = ent
        if listing:
            stack.extend(os.path.join(rel, n) if rel else n for n in reversed(listing))
    return out


def probe(root: Path, paths: list[bytes]) -> dict[bytes, tuple[Entry, list[bytes] | None]]:
    """Each given path looked up directly (not reached through listings), errors recorded."""
    r = os.fsencode(root)
    return {rel: probe_one(r, rel, tolerant=True) for rel in paths}


def hardlink_groups(snap: dict[bytes, Entry]) -> set[frozenset[bytes]]:
    """Sets of non-directory paths that share an inode number within one mount (size > 1)."""
    by_ino: dict[int, set[bytes]] = {}
    for path, ent in snap.items():
        if ent.type != "dir" and not ent.errors:
            by_ino.setdefault(ent.ino, set()).add(path)
    return {frozenset(v) for v in by_ino.values() if len(v) > 1}


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:100] + f"...({len(s)} chars)"


def diff(expected: dict[bytes, Entry], got: dict[bytes, Entry], limit: int = 60) -> list[str]:
    """Human-readable differences: 'path: field expected X got Y', plus hard-link groupings."""
    out: list[str] = []
    for path in sorted(expected.keys() - got.keys()):
        out.append(f"{path!r}: missing (expected {expected[path].type})")
    for path in sorted(got.keys() - expected.keys()):
        out.append(f"{path!r}: unexpected {got[path].type}")
    for path in sorted(expected.keys() & got.keys()):
        e, g = expected[path].fields(), got[path].fields()
        for k in e:
            if e[k] != g[k]:
                if k == "xattrs" and isinstance(e[k], dict) and isinstance(g[k], dict):
                    ek, gk = e[k], g[k]
                    assert isinstance(ek, dict) and isinstance(gk, dict)
                    for name in sorted(ek.keys() | gk.keys()):
                        if ek.get(name) != gk.get(name):
                            out.append(f"{path!r}: xattr {name!r} expected {_short(ek.get(name))} got {_short(gk.get(name))}")
                else:
                    ev, gv = e[k], g[k]
                    if k == "mode":
                        ev, gv = oct(int(ev)), oct(int(gv))  # type: ignore[call-overload]
                    out.append(f"{path!r}: {k} expected {_short(ev)} got {_short(gv)}")
    eg, gg = hardlink_groups(expected), hardlink_groups(got)
    for grp in sorted(eg - gg, key=sorted):
        out.append(f"hard-link group {sorted(grp)!r} not shared in the mount under test")
    for grp in sorted(gg - eg, key=sorted):
        out.append(f"paths {sorted(grp)!r} share an inode in the mount under test but not in the reference")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more differences"]
    return out


def compare_large_files(a_root: Path, b_root: Path, snap: dict[bytes, Entry]) -> list[str]:
    """Read every file the snapshot marked "large" from both mounts side by side."""
    out = []
    for rel, ent in snap.items():
        if ent.sha256 != "large":
            continue
        pa, pb = os.path.join(os.fsencode(a_root), rel), os.path.join(os.fsencode(b_root), rel)
        with open(pa, "rb", buffering=0) as fa, open(pb, "rb", buffering=0) as fb:
            off = 0
            while True:
                ca, cb = fa.read(CHUNK), fb.read(CHUNK)
                if ca != cb:
                    first = next((i for i in range(min(len(ca), len(cb))) if ca[i] != cb[i]), min(len(ca), len(cb)))
                    out.append(f"{rel!r}: content differs at byte {off + first} "
                               f"(chunk lengths {len(ca)} vs {len(cb)})")  # fmt: skip
                    break
                if not ca:
                    break
                off += len(ca)
    return out
