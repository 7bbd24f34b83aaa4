"""A deterministic sample dataset tree for the demo, the tests and the benchmarks.

The same arguments always give the same names, contents, modes and mtimes, so two trees made
with the same seed build byte-identical reproducible images.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_WORDS = (
    "sample temperature pressure velocity station record value mean median error run step "
    "model grid cell layer north south east west time series index latitude longitude depth "
    "the of and to in is for on with as by at from result dataset column row chunk total"
).split()

# All files get this mtime (plus a small per-file offset) so that trees are reproducible.
BASE_MTIME = 1_700_000_000


@dataclass(frozen=True)
class SampleStats:
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    logical_bytes: int


def _text_corpus(rng: random.Random, size: int) -> bytes:
    """Text-like bytes: lines of words and numbers, compressible roughly 3-4x."""
    out: list[str] = []
    total = 0
    while total < size:
        words = rng.choices(_WORDS, k=rng.randint(6, 14))
        line = " ".join(words) + f" {rng.randint(0, 99999)} {rng.random():.6f}\n"
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def _text_bytes(rng: random.Random, corpus: bytes, size: int) -> bytes:
    """*size* text-like bytes cut from random places of *corpus*."""
    parts: list[bytes] = []
    total = 0
    while total < size:
        n = min(size - total, rng.randint(2048, 16384))
        start = rng.randrange(0, len(corpus) - n)
        parts.append(corpus[start : start + n])
        total += n
    return b"".join(parts)


def _write(path: Path, data: bytes, mtime: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    os.utime(path, (mtime, mtime))


def generate_sample_tree(
    dest: Path, n_small: int = 2000, n_large: int = 2, large_size: int = 32 << 20, seed: int = 0
) -> SampleStats:
    """Create the sample tree under *dest* (created; must not exist or be empty).

    Small files are 4-64 KiB, alternating text-like (compressible) and random (incompressible),
    spread over nested directories. Large files alternate text-like and random too. Also: one
    symlink, one hard link, one empty file and one empty directory.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    rng = random.Random(seed)
    corpus = _text_corpus(rng, 2 << 20)
    files = dirs = logical = 0
    dir_paths: set[Path] = set()

    for i in range(n_small):
        sub = dest / f"group{i % 16:02d}" / f"part{(i // 16) % 4}"
        if sub not in dir_paths:
            sub.mkdir(parents=True, exist_ok=True)
            dir_paths.add(sub)
        size = rng.randint(4 << 10, 64 << 10)
        if i % 2 == 0:
            data = _text_bytes(rng, corpus, size)
            name = f"item{i:06d}.txt"
        else:
            data = rng.randbytes(size)
            name = f"item{i:06d}.bin"
        _write(sub / name, data, BASE_MTIME + i)
        files += 1
        logical += size

    if n_large:
        big = dest / "large"
        big.mkdir()
        dir_paths.add(big)
        for j in range(n_large):
            if j % 2 == 0:
                data = _text_bytes(rng, corpus, large_size)
                name = f"large{j:02d}.txt"
            else:
                # randbytes() of more than 256 MiB overflows: draw it in 64 MiB pieces
                # (identical output to one call for sizes up to 64 MiB).
                chunk = 64 << 20
                data = b"".join(rng.randbytes(min(chunk, large_size - o)) for o in range(0, large_size, chunk))
                name = f"large{j:02d}.bin"
            _write(big / name, data, BASE_MTIME + n_small + j)
            files += 1
            logical += large_size

    # The odd ones out: empty file, empty dir, a symlink, a hard link.
    meta = dest / "meta"
    meta.mkdir()
    dir_paths.add(meta)
    _write(meta / "empty.dat", b"", BASE_MTIME)
    files += 1
    readme = b"sample dataset generated with seed %d\n" % seed
    _write(meta / "README", readme, BASE_MTIME)
    files += 1
    logical += len(readme)
    os.link(meta / "README", meta / "README.hardlink")
    os.symlink("README", meta / "README.symlink")
    os.utime(meta / "README.symlink", (BASE_MTIME, BASE_MTIME), follow_symlinks=False)
    (meta / "empty_dir").mkdir()
    dir_paths.add(meta / "empty_dir")

    # Directory mtimes last (creating entries changes them), deepest first.
    all_dirs = set(dir_paths)
    for d in dir_paths:
        all_dirs.update(p for p in d.parents if dest in p.parents or p == dest)
    for d in sorted(all_dirs, key=lambda p: len(p.parts), reverse=True):
        os.chmod(d, 0o755)
        os.utime(d, (BASE_MTIME, BASE_MTIME))
    dirs = len(all_dirs - {dest})
    log.debug("sample tree %s: %d files, %d dirs, %d bytes", dest, files, dirs, logical)
    return SampleStats(files=files, dirs=dirs, symlinks=1, hardlinks=1, logical_bytes=logical)
