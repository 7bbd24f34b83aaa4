"""The one place that writes state files: atomic replace with fsync of file and directory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import NoSpaceError


def sync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", perms: int = 0o644) -> Iterator[IO[Any]]:
    """Open a temp file beside *path*; on clean exit fsync it and rename it over *path*.

    On any exception the temp file is removed and *path* is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, perms)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        sync_dir(target.parent)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left writing {target}") from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str, perms: int = 0o644) -> None:
    """Replace *path* with *data* atomically (temp file, fsync, rename, fsync dir)."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_open(path, "wb", perms) as f:
        f.write(raw)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, perms: int = 0o644) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", perms)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a JSON state file; a missing file gives *default*."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
