"""Fuzz worker: mutate a seed image and push each mutant through the squashfs reader.

Run as ``python fuzz_worker.py SEED_IMAGE FIRST LAST WORKDIR [--rlimit-as BYTES]``.  For each
index in [FIRST, LAST) it writes ``mutate(seed, index)`` to WORKDIR, then opens it with
`scratchfs.squashfs.Image`, walks it, reads every file (bounded), every symlink and every xattr.
One JSON line goes to stdout before (``{"begin": i}``) and after (``{"end": i, "outcome": …}``)
each image, flushed, so the parent can tell which image a hang or a crash belongs to; the parent
enforces the per-image timeout and watches for death by signal.  The address-space limit turns
unbounded allocation into a MemoryError, which counts as a failure like any exception that is
not a SquashfsError.

`mutate` is deterministic in (seed bytes, index), so the test can rebuild any mutant it reports.
"""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import sys
import traceback

SB_FORMAT = "<IIIIIHHHHHHQQQQQQQQ"
SB_FIELDS = ("magic", "inode_count", "mod_time", "block_size", "fragment_count", "compression", "block_log",
             "flags", "id_count", "version_major", "version_minor", "root_inode", "bytes_used", "id_table_start",
             "xattr_id_table_start", "inode_table_start", "directory_table_start", "fragment_table_start",
             "export_table_start")  # fmt: skip
SB_SIZES = [struct.calcsize("<" + c) for c in SB_FORMAT[1:]]
SB_OFFSETS = [sum(SB_SIZES[:i]) for i in range(len(SB_SIZES))]

READ_CAP = 1 << 20  # bytes read from the start of each file (the seed's files are smaller)
WALK_CAP = 20_000  # entries; the seed has ~70, so more means the walk does not terminate


def _metadata_region(sb: dict[str, int], size: int) -> tuple[int, int]:
    lo = sb["inode_table_start"]
    hi = sb["bytes_used"]
    if not (0 < lo < hi <= size):
        return 96, size
    return lo, hi


def mutate(seed: bytes, index: int) -> tuple[bytes, str]:
    """The index-th mutant of `seed` and a description of what was done."""
    rng = random.Random(index * 7919 + 17)
    data = bytearray(seed)
    sb = dict(zip(SB_FIELDS, struct.unpack_from(SB_FORMAT, seed), strict=True))
    kind = index % 6
    if kind == 0:  # a few random byte flips anywhere
        n = rng.randint(1, 8)
        spots = [rng.randrange(len(data)) for _ in range(n)]
        for p in spots:
            data[p] ^= rng.randrange(1, 256)
        return bytes(data), f"flip {n} bytes at {spots}"
    if kind == 1:  # byte flips in the metadata (inode/directory/fragment/xattr/id tables)
        lo, hi = _metadata_region(sb, len(data))
        n = rng.randint(1, 4)
        spots = [rng.randrange(lo, hi) for _ in range(n)]
        for p in spots:
            data[p] ^= 1 << rng.randrange(8)
        return bytes(data), f"flip bits in metadata at {spots}"
    if kind == 2:  # truncation
        cut = rng.randrange(0, len(data))
        return bytes(data[:cut]), f"truncate to {cut}"
    if kind == 3:  # a superblock field set to an edge or random value
        i = rng.randrange(len(SB_FIELDS))
        size = SB_SIZES[i]
        top = (1 << (8 * size)) - 1
        value = rng.choice([0, 1, 2, top, top - 1, len(data), len(data) + 1, len(data) - 1, 96,
                            rng.randrange(top + 1), sb[SB_FIELDS[i]] + rng.randint(-64, 64)]) & top  # fmt: skip
        data[SB_OFFSETS[i]:SB_OFFSETS[i] + size] = value.to_bytes(size, "little")
        return bytes(data), f"superblock {SB_FIELDS[i]} = {value}"
    if kind == 4:  # overwrite a run in the metadata with random bytes or a copy of another run
        lo, hi = _metadata_region(sb, len(data))
        start = rng.randrange(lo, hi)
        n = rng.randint(1, 64)
        if rng.random() < 0.5:
            data[start:start + n] = rng.randbytes(n)
            return bytes(data), f"random run of {n} at {start}"
        src = rng.randrange(lo, hi)
        data[start:start + n] = seed[src:src + n]
        return bytes(data[:len(seed)]), f"copy {n} bytes from {src} to {start}"
    # kind 5: a 16/32/64-bit little-endian word in the metadata set to an edge value
    lo, hi = _metadata_region(sb, len(data))
    width = rng.choice([2, 4, 8])
    start = rng.randrange(lo, max(lo + 1, hi - width))
    value = rng.choice([0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]) & ((1 << (8 * width)) - 1)
    data[start:start + width] = value.to_bytes(width, "little")
    return bytes(data), f"word{8 * width} at {start} = {value}"


def exercise(path: str) -> dict[str, int]:
    """Open, walk, read, readlink and list xattrs; SquashfsError is allowed anywhere."""
    from scratchfs.squashfs import Image, SquashfsError

    counts = {"entries": 0, "errors": 0, "bytes": 0}
    try:
        img = Image.open(path, cache_size=4 << 20)
    except SquashfsError:
        counts["errors"] += 1
        return counts
    with img:
        _ = img.info
        try:
            for _path, ino in img.walk():
                counts["entries"] += 1
                if counts["entries"] > WALK_CAP:
                    raise RuntimeError(f"walk did not end after {WALK_CAP} entries")
                for op in ("xattrs", "content"):
                    try:
                        if op == "xattrs":
                            img.xattrs(ino)
                        elif ino.is_symlink:
                            img.readlink(ino)
                        elif ino.is_file:
                            off = 0
                            while off < min(ino.size, READ_CAP):
                                chunk = img.read(ino, off, 65536)
                                if not chunk:
                                    break
                                off += len(chunk)
                            counts["bytes"] += off
                            if ino.size > READ_CAP:  # the far end of a (claimed) huge file
                                img.read(ino, ino.size - 4096, 8192)
                    except SquashfsError:
                        counts["errors"] += 1
        except SquashfsError:
            counts["errors"] += 1
    return counts


def main(argv: list[str]) -> int:
    seed_path, first, last, workdir = argv[0], int(argv[1]), int(argv[2]), argv[3]
    if "--rlimit-as" in argv:
        limit = int(argv[argv.index("--rlimit-as") + 1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import scratchfs.squashfs  # noqa: F401  (import before the first image: not part of its time)

    with open(seed_path, "rb") as f:
        seed = f.read()
    path = os.path.join(workdir, f"mutant-{os.getpid()}.sqfs")
    for i in range(first, last):
        data, what = mutate(seed, i)
        with open(path, "wb") as f:
            f.write(data)
        print(json.dumps({"begin": i}), flush=True)
        try:
            counts = exercise(path)
            result = {"end": i, "outcome": "ok", **counts}
        except BaseException as e:  # anything but SquashfsError escaping exercise() is a finding
            result = {"end": i, "outcome": "exception", "type": type(e).__name__, "message": str(e)[:500],
                      "traceback": traceback.format_exc()[-3000:], "mutation": what}  # fmt: skip
        print(json.dumps(result), flush=True)
    os.unlink(path) if os.path.exists(path) else None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
