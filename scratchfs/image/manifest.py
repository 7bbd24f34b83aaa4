"""The manifest beside an image (``IMAGE.manifest.json``) and the check "is this still that image?".

A manifest records how an image was built and what it looked like right after: size, mtime,
the 96 superblock bytes and a checksum. ``check_image`` compares an image with its manifest:
cheap by default (one stat and one 96-byte read), the full checksum only when asked.

The checksum ("xxh3-128-tree"): the image is cut into CHUNK-byte pieces, each hashed with
XXH3-128 (in parallel), and the result is the XXH3-128 of the concatenated piece digests.
XXH3 runs at memory speed (7 GB/s on one core here, SHA-256 1 GB/s), so the checksum of a
new image costs a build a few percent, not a sixth. It detects damaged and replaced images; it
is not a signature (whoever can replace an image can rewrite its manifest too). Manifests
written with the earlier "sha256-tree" (the same tree, SHA-256) are still checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ..errors import BadImageError, NotFoundError
from ..state import atomic_write_json, read_json

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".manifest.json"
SUPERBLOCK_SIZE = 96
CHECKSUM_ALGORITHM = "xxh3-128-tree"
LEGACY_ALGORITHM = "sha256-tree"  # manifests and cache records written before xxh3
HASHES: dict[str, Callable[[], Any]] = {CHECKSUM_ALGORITHM: xxhash.xxh3_128, LEGACY_ALGORITHM: hashlib.sha256}
CHUNK = 8 << 20
_READ = 1 << 20


class ManifestError(BadImageError):
    """A manifest that exists but cannot be used (not JSON, wrong format)."""


def manifest_path(image: str | os.PathLike[str]) -> Path:
    p = Path(image)
    return p.with_name(p.name + SUFFIX)


def read_superblock(image: str | os.PathLike[str]) -> bytes:
    with open(image, "rb") as f:
        return f.read(SUPERBLOCK_SIZE)


def new_hash(algorithm: str = CHECKSUM_ALGORITHM) -> Any:
    """A fresh hash object (update/digest/hexdigest) of a tree checksum *algorithm*."""
    return HASHES[algorithm]()


def tree_digest(piece_digests: list[bytes], algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """The checksum (hex) from the digests of the image's CHUNK-byte pieces, in order."""
    top = new_hash(algorithm)
    top.update(b"".join(piece_digests))
    return str(top.hexdigest())


def _hash_piece(fd: int, start: int, length: int, algorithm: str) -> bytes:
    h = new_hash(algorithm)
    buf = bytearray(_READ)
    view = memoryview(buf)
    pos, end = start, start + length
    while pos < end:
        n = os.preadv(fd, [view[: min(_READ, end - pos)]], pos)
        if n <= 0:
            raise BadImageError(f"image shrank while hashing (at byte {pos})")
        h.update(view[:n])
        pos += n
    return h.digest()


def image_checksum(
    image: str | os.PathLike[str],
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    algorithm: str = CHECKSUM_ALGORITHM,
) -> str:
    """The tree checksum of *image* as hex (see the module docstring)."""
    if algorithm not in HASHES:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        starts = list(range(0, size, CHUNK)) or [0]
        workers = max(1, min(threads or os.cpu_count() or 1, len(starts)))
        digests: list[bytes] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checksum") as pool:
            # map() keeps the order; pieces are read and hashed concurrently.
            for i, d in enumerate(pool.map(lambda s: _hash_piece(fd, s, min(CHUNK, size - s), algorithm), starts)):
                digests.append(d)
                if progress:
                    progress(min(CHUNK, size - starts[i]))
        return tree_digest(digests, algorithm)
    finally:
        os.close(fd)


@dataclass
class Manifest:
    image_name: str
    image_bytes: int
    image_mtime_ns: int
    superblock_hex: str
    checksum: str | None  # None when the build was asked not to compute it
    created: float  # epoch seconds (wall clock at build time)
    tool: dict[str, Any] = field(default_factory=dict)  # name, version, argv
    options: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # files, dirs, symlinks, hardlinks, other
    logical_bytes: int = 0
    source: str = ""
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "image": {
                "name": self.image_name,
                "bytes": self.image_bytes,
                "mtime_ns": self.image_mtime_ns,
                "superblock": self.superblock_hex,
                "checksum": self.checksum,
                "checksum_algorithm": self.checksum_algorithm,
                "checksum_chunk": CHUNK,
            },
            "created": self.created,
            "tool": self.tool,
            "options": self.options,
            "counts": self.counts,
            "logical_bytes": self.logical_bytes,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown manifest format {d.get('format')!r}")
            im = d["image"]
            return cls(
                image_name=str(im["name"]),
                image_bytes=int(im["bytes"]),
                image_mtime_ns=int(im["mtime_ns"]),
                superblock_hex=str(im["superblock"]),
                checksum=None if im.get("checksum") is None else str(im["checksum"]),
                checksum_algorithm=str(im.get("checksum_algorithm", LEGACY_ALGORITHM)),
                created=float(d["created"]),
                tool=dict(d.get("tool") or {}),
                options=dict(d.get("options") or {}),
                counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()},
                logical_bytes=int(d.get("logical_bytes", 0)),
                source=str(d.get("source", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"not a scratchfs image manifest: {e}") from None


def describe_image(image: str | os.PathLike[str], checksum: str | None, created: float, **kw: Any) -> Manifest:
    """A Manifest for *image* as it is on disk now (size, mtime, superblock) plus *kw*."""
    st = os.stat(image)
    return Manifest(
        image_name=Path(image).name,
        image_bytes=st.st_size,
        image_mtime_ns=st.st_mtime_ns,
        superblock_hex=read_superblock(image).hex(),
        checksum=checksum,
        created=created,
        **kw,
    )


def write_manifest(image: str | os.PathLike[str], manifest: Manifest, path: str | os.PathLike[str] | None = None) -> Path:
    """Write *manifest* atomically beside *image* (or to *path*); returns where."""
    dest = Path(path) if path is not None else manifest_path(image)
    atomic_write_json(dest, manifest.to_json())
    return dest


def read_manifest(image: str | os.PathLike[str]) -> Manifest | None:
    """The manifest beside *image*; None when there is none; ManifestError when unusable."""
    p = manifest_path(image)
    try:
        d = read_json(p)
    except ValueError as e:
        raise ManifestError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise ManifestError(f"{p}: {os.strerror(e.errno or 0)}") from None
    if d is None:
        return None
    return Manifest.from_json(d)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    problems: tuple[str, ...] = ()
    checksum_checked: bool = False

    def __bool__(self) -> bool:
        return self.ok


def check_image(
    image: str | os.PathLike[str], manifest: Manifest | None = None, full: bool = False, threads: int | None = None
) -> CheckResult:
    """Does *image* still match its manifest? Size, mtime and the superblock bytes always;
    the full checksum only when *full* is true. *manifest* defaults to the one beside the image.

    Raises NotFoundError when the image or (with no *manifest* given) its manifest is missing.
    """
    if manifest is None:
        manifest = read_manifest(image)
        if manifest is None:
            raise NotFoundError(f"{manifest_path(image)}: no manifest")
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise NotFoundError(f"{image}: no such image") from None
    problems: list[str] = []
    if st.st_size != manifest.image_bytes:
        problems.append(f"size is {st.st_size}, manifest says {manifest.image_bytes}")
    if st.st_mtime_ns != manifest.image_mtime_ns:
        problems.append("modification time differs from the manifest")
    if read_superblock(image).hex() != manifest.superblock_hex:
        problems.append("superblock differs from the manifest")
    checked = False
    if full and not problems:
        if manifest.checksum is None:
            problems.append("the manifest holds no checksum")
        elif manifest.checksum_algorithm not in HASHES:
            problems.append(f"unknown checksum algorithm {manifest.checksum_algorithm!r}")
        else:
            checked = True
            if image_checksum(image, threads, algorithm=manifest.checksum_algorithm) != manifest.checksum:
                problems.append("checksum differs from the manifest (image damaged)")
    return CheckResult(ok=not problems, problems=tuple(problems), checksum_checked=checked)


def image_matches(image: str | os.PathLike[str], full: bool = False) -> bool:
    """True when *image* exists, has a manifest and still matches it."""
    try:
        return check_image(image, full=full).ok
    except (NotFoundError, ManifestError):
        return False
