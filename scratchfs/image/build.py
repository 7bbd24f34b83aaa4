"""`scratchfs image build`: a squashfs image from a directory, safely.

The image is written by mksquashfs (or gensquashfs) to a temp file beside OUT, fsynced, and
only then put under the final name: a build that fails, is interrupted or is killed never
leaves a partial image under OUT and never replaces an existing OUT without ``force``.

Temp files are named ``.OUT.build-HOST-PID-RANDOM.tmp``. A build removes its own temp file on
every exit path it lives through; after a SIGKILL (or power loss) the temp file stays. A later
build never deletes such files (it cannot prove nobody else is writing them); it names them in
a warning, saying whether the recorded PID is still alive on this host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import (
    EnvironmentProblem,
    ExternalFailure,
    NoSpaceError,
    NotFoundError,
    PermissionRefused,
    UsageError,
)
from ..state import sync_dir
from .manifest import Manifest, describe_image, image_checksum, write_manifest
from .progress import Reporter, Snapshot
from .scan import Excluder, ScanResult, choose_block_size, display_path, scan_source

log = logging.getLogger(__name__)

COMPRESSIONS = ("zstd", "gzip", "xz", "lz4", "lzo")
# zstd decompresses equally fast at every level; level 3 builds several times faster than
# mksquashfs' default 15 for an image a few percent larger.
DEFAULT_LEVEL: dict[str, int] = {"zstd": 3}
LEVEL_RANGE: dict[str, tuple[int, int]] = {"zstd": (1, 22), "gzip": (1, 9), "lzo": (1, 9)}
MIN_BLOCK, MAX_BLOCK = 128 << 10, 1 << 20
TOOLS = ("mksquashfs", "gensquashfs")
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.build-(?P<host>[^-]+(?:-[^-]+)*)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


@dataclass
class BuildOptions:
    compression: str = "zstd"
    level: int | None = None  # None: DEFAULT_LEVEL or the tool's own default
    block_size: int | None = None  # None: chosen from the data (choose_block_size)
    excludes: list[str] = field(default_factory=list)
    threads: int | None = None
    reproducible: bool = False
    normalize_permissions: bool = False
    all_root: bool = False
    force: bool = False
    skip_unreadable: bool = False
    tool: str | None = None  # None: mksquashfs, else gensquashfs
    checksum: bool = True

    def validate(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {self.compression!r} (choose from {', '.join(COMPRESSIONS)})")
        if self.level is not None:
            rng = LEVEL_RANGE.get(self.compression)
            if rng is None:
                raise UsageError(f"--level is not supported for {self.compression}")
            if not rng[0] <= self.level <= rng[1]:
                raise UsageError(f"--level for {self.compression} must be {rng[0]}..{rng[1]}, not {self.level}")
        if self.block_size is not None:
            bs = self.block_size
            if not (MIN_BLOCK <= bs <= MAX_BLOCK) or bs & (bs - 1):
                raise UsageError(f"--block-size must be a power of two from 128K to 1M, not {bs}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {self.threads}")
        if self.tool is not None and self.tool not in TOOLS:
            raise UsageError(f"unknown tool {self.tool!r} (choose from {', '.join(TOOLS)})")

    def effective_level(self) -> int | None:
        return self.level if self.level is not None else DEFAULT_LEVEL.get(self.compression)


@dataclass
class BuildResult:
    image: Path
    manifest_path: Path
    manifest: Manifest
    scan: ScanResult
    tool: str
    argv: list[str]
    block_size: int
    seconds: float
    tool_seconds: float
    checksum_seconds: float
    skipped: list[bytes] = field(default_factory=list)


# ---------------------------------------------------------------- pure helpers


def escape_wildcard(rel: bytes) -> bytes:
    """A relative path as an exact mksquashfs ``-wildcards`` pattern (every special byte escaped)."""
    out = bytearray()
    for c in rel:
        if c == 0x2F or 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
            out.append(c)
        else:
            out += b"\\" + bytes([c])
    return bytes(out)


def builder_memory(threads: int | None) -> int:
    """Memory for mksquashfs' queues: 16 MiB per compressor thread, at least 128 MiB.

    Its default (a quarter of RAM) lets the reader run gigabytes ahead of the compressors, so
    "bytes read" would say nothing about progress, and a build would take a quarter of a shared
    node's memory. A few blocks in flight per thread keep every compressor busy.
    """
    n = threads or os.cpu_count() or 1
    return max(128 << 20, n * (16 << 20))


def mksquashfs_argv(
    tool: str,
    src: str,
    dest: str,
    opts: BuildOptions,
    block_size: int,
    sparse: bool,
    mkfs_time: int | None,
    exclude_file: str | None,
    exclude_args: Sequence[bytes] = (),
) -> list[str]:
    argv = [tool, src, dest, "-noappend", "-quiet", "-no-progress", "-no-exports"]
    argv += ["-comp", opts.compression, "-b", str(block_size), "-mem", f"{builder_memory(opts.threads) >> 20}M"]
    level = opts.effective_level()
    if level is not None:
        argv += ["-Xcompression-level", str(level)]
    if not sparse:
        argv.append("-no-sparse")
    if opts.threads:
        argv += ["-processors", str(opts.threads)]
    if opts.reproducible:
        argv.append("-reproducible")
        if mkfs_time is not None:
            argv += ["-mkfs-time", str(mkfs_time)]
    if opts.all_root:
        argv.append("-all-root")
    if opts.normalize_permissions:
        argv += ["-root-mode", "0755", "-action", "chmod(0755)@type(d)", "-action", "chmod(0644)@type(f)"]
    if exclude_file or exclude_args:
        argv.append("-wildcards")
        if exclude_file:
            argv += ["-ef", exclude_file]
        if exclude_args:  # -e takes the rest of the command line
            argv += ["-e"] + [os.fsdecode(escape_wildcard(e)) for e in exclude_args]
    return argv


def gensquashfs_argv(tool: str, src: str, dest: str, opts: BuildOptions, block_size: int) -> list[str]:
    argv = [tool, "--pack-dir", src, "--keep-time", "--keep-xattr", "--quiet", "--force"]
    argv += ["--compressor", opts.compression, "--block-size", str(block_size)]
    level = opts.effective_level()
    if level is not None:
        argv += ["--comp-extra", f"level={level}"]
    if opts.threads:
        argv += ["--num-jobs", str(opts.threads)]
    if opts.all_root:
        argv.append("--all-root")
    argv.append(dest)
    return argv


def temp_name(out: Path, host: str, pid: int, token: str) -> Path:
    return out.with_name(f".{out.name}.build-{host}-{pid}-{token}.tmp")


def is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------- environment


def find_tool(requested: str | None) -> tuple[str, str]:
    """(name, path) of the builder to use; EnvironmentProblem when it is missing."""
    if requested:
        path = shutil.which(requested)
        if not path:
            raise EnvironmentProblem(
                f"{requested} not found (install {'squashfs-tools' if requested == 'mksquashfs' else 'squashfs-tools-ng'})"
            )
        return requested, path
    path = shutil.which("mksquashfs")
    if path:
        return "mksquashfs", path
    path = shutil.which("gensquashfs")
    if path:
        log.info("mksquashfs not found; building with gensquashfs")
        return "gensquashfs", path
    raise EnvironmentProblem("mksquashfs not found (install squashfs-tools, or squashfs-tools-ng for gensquashfs)")


def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"version\s+(\S+)", out.stdout + out.stderr) or re.search(r"\)\s+(\d[\w.]*)", out.stdout)
    return m.group(1) if m else "unknown"


def leftover_temps(out: Path, host: str) -> list[tuple[Path, str]]:
    """Temp files of earlier builds of *out* that are still lying around, with a note each."""
    found = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    for name in names:
        m = TEMP_RE.match(name)
        if not m or m.group("name") != out.name:
            continue
        pid = int(m.group("pid"))
        if m.group("host") != host:
            note = f"from host {m.group('host')}"
        elif Path(f"/proc/{pid}").exists():
            note = f"pid {pid} is running"
        else:
            note = f"pid {pid} is gone; left by an interrupted build"
        found.append((out.parent / name, note))
    return found


_PR_SET_PDEATHSIG = 1


_prctl: Any = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the builder gets SIGKILL when we die, so a
    killed build does not leave mksquashfs running. (_prctl is looked up before the fork.)"""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _load_prctl() -> None:
    global _prctl
    if _prctl is None:
        with contextlib.suppress(OSError, AttributeError):
            _prctl = ctypes.CDLL(None, use_errno=True).prctl


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk, without waiting (sync_file_range).

    Called while the builder writes the image, so the disk works in parallel with compression
    and the final fsync finds little left to write. Only a hint: errors are ignored (the fsync
    that follows the build reports real ones).
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = f
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once *proc* has exited; waits up to *timeout* s, woken at once by the exit.

    (Popen.wait with a timeout polls with sleeps of up to 50 ms; a pidfd wakes immediately.)
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _read_rchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _drain(stream: IO[bytes], sink: deque[str], all_lines: list[str]) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "backslashreplace").rstrip("\n")
        sink.append(line)
        all_lines.append(line)


_UNREADABLE_RE = re.compile(r"^(?:Failed to read file (?P<f>.*), creating empty file|Could not open (?P<d>.*), skipping)")


# ---------------------------------------------------------------- the build


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not os.path.lexists(src):
        raise NotFoundError(f"{src}: no such source directory")
    if not src.is_dir():
        raise UsageError(f"{src}: source is not a directory")
    parent = out.parent
    if not parent.is_dir():
        raise NotFoundError(f"{parent}: output directory does not exist")
    if out.is_dir():
        raise UsageError(f"{out}: output is a directory")
    if is_inside(os.path.realpath(parent), os.path.realpath(src)):
        raise UsageError(f"{out}: output must not be inside the source tree {src}")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} exists (use --force to replace it)")


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished temp file under its final name; without *force* never replace."""
    if force:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)  # fails if out appeared meanwhile: no clobbering race
        except FileExistsError:
            raise UsageError(f"{out} appeared during the build (use --force to replace it)") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            if os.path.lexists(out):
                raise UsageError(f"{out} appeared during the build (use --force to replace it)") from None
            os.rename(tmp, out)
        else:
            os.unlink(tmp)
    sync_dir(out.parent)


def build_image(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: BuildOptions,
    reporter: Reporter | None = None,
    poll_interval: float = 0.2,
) -> BuildResult:
    opts.validate()
    src_p, out_p = Path(src), Path(out)
    _check_paths(src_p, out_p, opts.force)
    tool, tool_path = find_tool(opts.tool)
    if tool == "gensquashfs" and (opts.excludes or opts.normalize_permissions or opts.reproducible):
        raise UsageError("--exclude, --normalize-permissions and --reproducible need mksquashfs")
    t0 = time.monotonic()

    excluder = Excluder(opts.excludes)
    log.info("scanning %s", src_p)
    scan = scan_source(os.fsencode(src_p), excluder)
    log.debug(
        "scan: %d files, %d dirs, %d symlinks, %d bytes, %d excluded, %d unreadable",
        scan.files, scan.dirs, scan.symlinks, scan.logical_bytes, len(scan.excluded), len(scan.unreadable),
    )
    skipped: list[bytes] = []
    if scan.unreadable:
        if not opts.skip_unreadable:
            for rel, why in scan.unreadable:
                log.error("unreadable: %s: %s", display_path(rel), why)
            raise PermissionRefused(
                f"{len(scan.unreadable)} unreadable entr{'y' if len(scan.unreadable) == 1 else 'ies'} in {src_p}"
                " (listed above; --skip-unreadable leaves them out)"
            )
        if tool == "gensquashfs":
            raise UsageError("--skip-unreadable needs mksquashfs")
        skipped = [rel for rel, _ in scan.unreadable]
        for rel, why in scan.unreadable:
            log.warning("skipping unreadable %s: %s", display_path(rel), why)

    block_size = opts.block_size or choose_block_size(scan.sizes)
    host = socket.gethostname().replace("/", "_")
    for path, note in leftover_temps(out_p, host):
        log.warning("leftover temp file %s (%s); remove it if no build is running", path, note)

    mkfs_time: int | None = None
    env = dict(os.environ)
    if opts.reproducible:
        sde = env.pop("SOURCE_DATE_EPOCH", None)
        mkfs_time = int(sde) if sde and sde.isdigit() else scan.newest_mtime

    tmp = temp_name(out_p, host, os.getpid(), secrets.token_hex(4))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left on the output filesystem of {out_p}") from e
        raise
    _load_prctl()
    exclude_file: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    published = False
    try:
        to_exclude = list(scan.excluded) + skipped
        if tool == "mksquashfs":
            newline_names = [e for e in to_exclude if b"\n" in e]
            listed = [e for e in to_exclude if b"\n" not in e]
            if listed:
                with tempfile.NamedTemporaryFile("wb", prefix="scratchfs-exclude-", delete=False) as ef:
                    ef.write(b"".join(escape_wildcard(e) + b"\n" for e in listed))
                    exclude_file = ef.name
            argv = mksquashfs_argv(
                tool_path, os.fspath(src_p), os.fspath(tmp), opts, block_size,
                sparse=scan.sparse_files > 0, mkfs_time=mkfs_time, exclude_file=exclude_file,
                exclude_args=newline_names,
            )
        else:
            argv = gensquashfs_argv(tool_path, os.fspath(src_p), os.fspath(tmp), opts, block_size)
        log.debug("running %s", argv)

        t_tool = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, preexec_fn=_die_with_parent,
        )
        tail: deque[str] = deque(maxlen=20)
        lines: list[str] = []
        drains = [
            threading.Thread(target=_drain, args=(s, tail, lines), daemon=True)
            for s in (proc.stdout, proc.stderr) if s is not None
        ]
        for th in drains:
            th.start()
        total_files = scan.files - len(skipped)
        wb_fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                if _wait_exit(proc, poll_interval):
                    rc = proc.wait()
                    break
                _start_writeback(wb_fd)
                if reporter:
                    done = min(_read_rchar(proc.pid) or 0, scan.logical_bytes)
                    reporter.update(
                        Snapshot(bisect_right(scan.cumulative, done), total_files, done, scan.logical_bytes,
                                 time.monotonic() - t_tool),
                        time.monotonic(),
                    )
        finally:
            os.close(wb_fd)
        for th in drains:
            th.join(timeout=10)
        tool_seconds = time.monotonic() - t_tool
        if rc != 0:
            text = "\n".join(lines)
            if "No space left" in text or "Disk quota exceeded" in text:
                raise NoSpaceError(f"no space left on the output filesystem of {out_p}")
            last = next((ln for ln in reversed(tail) if ln.strip()), f"exit status {rc}")
            raise ExternalFailure(f"{tool} failed: {last.strip()}")
        late_unreadable = [m.group("f") or m.group("d") for m in map(_UNREADABLE_RE.match, lines) if m]
        if late_unreadable:
            for p in late_unreadable:
                log.error("unreadable: %s", p)
            if not opts.skip_unreadable:
                raise PermissionRefused(f"{len(late_unreadable)} entries of {src_p} could not be read (listed above)")
            log.warning("%d unreadable files are empty in the image", len(late_unreadable))
        if reporter:
            reporter.finish(Snapshot(total_files, total_files, scan.logical_bytes, scan.logical_bytes, tool_seconds))

        # fsync (waiting on the disk) and checksum (reading from the page cache) overlap
        t_sum = time.monotonic()
        with open(tmp, "rb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync") as ex:
            synced = ex.submit(os.fsync, f.fileno())
            checksum = image_checksum(tmp, opts.threads) if opts.checksum else None
            synced.result()
        checksum_seconds = time.monotonic() - t_sum
        options = asdict(opts)
        if tool == "mksquashfs":
            options["builder_memory"] = builder_memory(opts.threads)
        options.update(level=opts.effective_level(), block_size=block_size, sparse=scan.sparse_files > 0,
                       mkfs_time=mkfs_time, exports=False)
        for k in ("force", "tool", "checksum"):
            options.pop(k)
        manifest = describe_image(
            tmp, checksum, time.time(),
            tool={"name": tool, "version": tool_version(tool_path), "argv": [os.path.basename(argv[0])] + argv[1:]},
            options=options,
            counts={"files": scan.files - len(skipped), "dirs": scan.dirs, "symlinks": scan.symlinks,
                    "hardlinks": scan.hardlinks, "other": scan.other},
            logical_bytes=scan.logical_bytes,
            source=os.path.abspath(src_p),
        )
        manifest.image_name = out_p.name
        # Image first, then its manifest: a crash in between leaves a complete image with no
        # (or the previous) manifest, which check_image reports as not matching.
        _publish(tmp, out_p, opts.force)
        published = True
        mpath = write_manifest(out_p, manifest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left on the output filesystem of {out_p}") from e
        raise
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if exclude_file:
            with contextlib.suppress(OSError):
                os.unlink(exclude_file)
        if not published:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return BuildResult(
        image=out_p, manifest_path=mpath, manifest=manifest, scan=scan, tool=tool, argv=argv,
        block_size=block_size, seconds=time.monotonic() - t0, tool_seconds=tool_seconds,
        checksum_seconds=checksum_seconds, skipped=skipped,
    )

