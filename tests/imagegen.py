"""Builders of test source trees and squashfs images for the read-path tests.

`build_full_tree` writes a source directory holding every feature the conformance tests need
(see its docstring); `build_image` packs a tree with mksquashfs or gensquashfs according to an
`ImageSpec`; `MATRIX` is the set of images the conformance tests mount.  `read_superblock` and
`SUPERBLOCK_FIELDS` describe the on-disk superblock so the bad-input tests can damage it on
purpose.  Everything here uses only the standard library and squashfs-tools / squashfs-tools-ng.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

IS_ROOT = os.geteuid() == 0

# File sizes around the block boundaries of every block size in MATRIX (4 KiB, 16 KiB, 32 KiB,
# 128 KiB, 1 MiB): one block minus/plus one, exact multiples, and sizes with a tail that lands in
# a fragment (or in a short last block when fragments are off).
DATA_SIZES = sorted(
    {0, 1, 2, 100}
    | {bs + d for bs in (4 * KiB, 16 * KiB, 32 * KiB, 128 * KiB, MiB) for d in (-1, 0, 1)}
    | {3 * 4 * KiB + 5, 2 * 16 * KiB + 7, 3 * 128 * KiB + 100, 2 * MiB + 512 * KiB + 7}
)

BIG_DIR_ENTRIES = 20_000
SMALL_BIG_DIR = 3_000  # still > 2048 distinct uids (several id-table blocks) and many dir headers
DEEP_LEVELS = 100
BIG_SPARSE_SIZE = 4 * GiB + 12_345  # > 4 GiB: needs 64-bit sizes (extended inodes)

UIDS = [0, 1, 999, 65534, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 2]
MODES = [0o000, 0o400, 0o111, 0o644, 0o755, 0o4755, 0o2755, 0o6755, 0o1755, 0o7777]
EDGE_MTIMES = {b"mtime_0": 0, b"mtime_1": 1, b"mtime_2038m1": 2**31 - 1, b"mtime_2038p5": 2**31 + 5,
               b"mtime_u32max": 2**32 - 1}

WORDS = (b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         b"sigma tau upsilon phi chi psi omega squashfs scratch dataset block fragment inode").split()


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible but not trivially repetitive bytes (words drawn from a seeded generator)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(WORDS, k=64)) + b"\n%d\n" % rng.getrandbits(32)
    return bytes(out[:n])


def random_bytes(n: int, seed: int) -> bytes:
    """Incompressible bytes: squashfs stores such blocks uncompressed."""
    return random.Random(seed).randbytes(n)


def mixed_bytes(n: int, seed: int, block: int) -> bytes:
    """Alternating incompressible and compressible blocks of `block` bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += random_bytes(block, seed + i) if i % 2 == 0 else text_bytes(block, seed + i)
        i += 1
    return bytes(out[:n])


def _mtime_for(rel: bytes) -> int:
    return 1_200_000_000 + zlib.crc32(rel) % 500_000_000


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _sparse(path: bytes, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        for off, data in pieces:
            f.seek(off)
            f.write(data)
        f.truncate(size)


def build_full_tree(root: Path, *, big_sparse: bool = False, big_dir_entries: int = BIG_DIR_ENTRIES,
                    deep_levels: int = DEEP_LEVELS, with_names: bool = True) -> None:
    """Write the conformance source tree under `root` (which must not exist yet).

    Contents: an empty file and an empty dir; data/ (text, random and mixed files of every size in
    DATA_SIZES, plus a duplicate); sparse/ (holes at start/middle/end, all-hole, dense zeros and,
    with `big_sparse`, a file larger than 4 GiB that costs nothing on disk); links/ (hard-link
    groups of files, an empty file, a symlink and a fifo; symlinks relative, absolute, dangling,
    to '.', '..', non-UTF-8, 255 and 4095 bytes long); special/ (fifo, char and block devices
    with large major/minor, a unix socket); xattrs/ (user.*, and as root trusted.* and
    security.*, empty and 2000-byte binary values, shared values, on dirs and symlinks);
    owners/ (uids/gids up to 2**32-2, setuid/setgid/sticky modes, edge mtimes up to 2**32-1);
    names/ (255-byte and non-UTF-8 names, control characters); big/ (`big_dir_entries` entries,
    more than 2048 distinct uids so the id table spans several metadata blocks); deep/
    (`deep_levels` nested directories).  Root-only parts are left out when not run as root.
    """
    r = os.fsencode(root)
    os.mkdir(r)
    owners: dict[bytes, tuple[int, int]] = {}
    modes: dict[bytes, int] = {}
    mtimes: dict[bytes, int] = {}

    def p(rel: bytes) -> bytes:
        return os.path.join(r, rel)

    def mkdir(rel: bytes) -> None:
        os.mkdir(p(rel))

    _write(p(b"empty_file"), b"")
    mkdir(b"empty_dir")

    # data/
    mkdir(b"data")
    for i, size in enumerate(DATA_SIZES):
        _write(p(b"data/text_%d" % size), text_bytes(size, 1000 + i))
        if size <= 128 * KiB + 1 or size == MiB + 1:  # incompressible data is slow to pack with xz
            _write(p(b"data/rand_%d" % size), random_bytes(size, 2000 + i))
    _write(p(b"data/mixed_4k"), mixed_bytes(13 * 4 * KiB + 333, 7, 4 * KiB))
    _write(p(b"data/mixed_128k"), mixed_bytes(5 * 128 * KiB + 4444, 8, 128 * KiB))
    _write(p(b"data/mixed_1m"), mixed_bytes(2 * MiB + 55, 9, MiB))
    shutil.copyfile(p(b"data/text_%d" % (3 * 128 * KiB + 100)), p(b"data/duplicate_of_text"))

    # sparse/
    mkdir(b"sparse")
    _sparse(p(b"sparse/hole_middle"), 300 * KiB + 2 * MiB + 100 * KiB,
            [(0, text_bytes(300 * KiB, 31)), (300 * KiB + 2 * MiB, random_bytes(100 * KiB, 32))])
    _sparse(p(b"sparse/hole_start"), MiB + 10, [(MiB, b"0123456789")])
    _sparse(p(b"sparse/hole_end"), 3 * MiB, [(0, b"0123456789")])
    _sparse(p(b"sparse/all_hole"), 5 * MiB + 3, [])
    _write(p(b"sparse/dense_zeros"), bytes(600 * KiB))
    if big_sparse:
        _sparse(p(b"sparse/big_over_4g"), BIG_SPARSE_SIZE,
                [(0, b"head"), (2**32 - 4, b"4GiB-boundary"), (3 * GiB + 77, random_bytes(200 * KiB, 33)),
                 (BIG_SPARSE_SIZE - 4, b"tail")])

    # links/
    mkdir(b"links")
    mkdir(b"links/sub")
    _write(p(b"links/hl_a"), text_bytes(70 * KiB, 41))
    os.link(p(b"links/hl_a"), p(b"links/hl_b"))
    os.link(p(b"links/hl_a"), p(b"links/sub/hl_c"))
    os.link(p(b"links/hl_a"), p(b"data/hl_d_in_data"))
    _write(p(b"links/hl_empty_a"), b"")
    os.link(p(b"links/hl_empty_a"), p(b"links/hl_empty_b"))
    os.symlink(b"hl_a", p(b"links/sym_to_hl"))
    os.link(p(b"links/sym_to_hl"), p(b"links/sym_hardlinked"), follow_symlinks=False)
    os.mkfifo(p(b"links/fifo_a"))
    os.link(p(b"links/fifo_a"), p(b"links/fifo_b"))
    os.symlink(b"../data/text_4096", p(b"links/relative"))
    os.symlink(b"/etc/passwd", p(b"links/absolute"))
    os.symlink(b"does/not/exist", p(b"links/dangling"))
    os.symlink(b".", p(b"links/dot"))
    os.symlink(b"..", p(b"links/dotdot"))
    os.symlink(b"non-utf8-\xff\xfe-target", p(b"links/non_utf8_target"))
    os.symlink(b"t" * 255, p(b"links/target_255"))
    os.symlink((b"long/" * 820)[:4094] + b"Z", p(b"links/target_4095"))
    os.symlink(b"/" + b"a" * 4094, p(b"links/absolute_4095"))

    # special/
    mkdir(b"special")
    os.mkfifo(p(b"special/fifo"))
    if IS_ROOT:
        os.mknod(p(b"special/null_like"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(p(b"special/chr_big"), stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
        os.mknod(p(b"special/blk"), stat.S_IFBLK | 0o660, os.makedev(8, 1))
        os.mknod(p(b"special/blk_minor_big"), stat.S_IFBLK | 0o640, os.makedev(259, 65537))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(p(b"special/socket"))

    # xattrs/
    mkdir(b"xattrs")
    big_value = random_bytes(2000, 51) + b"\x00\x00end"
    shared_value = text_bytes(700, 52)
    x = p(b"xattrs/user_only")
    _write(x, b"has user xattrs\n")
    os.setxattr(x, b"user.a", b"1")
    os.setxattr(x, b"user.empty", b"")
    os.setxattr(x, b"user.binary", big_value)
    x = p(b"xattrs/many")
    _write(x, b"")
    for k in range(30):
        os.setxattr(x, b"user.k%02d" % k, b"v" * k)
    for k in range(4):
        x = p(b"xattrs/shared_%d" % k)
        _write(x, b"shared %d\n" % k)
        os.setxattr(x, b"user.shared", shared_value)
        os.setxattr(x, b"user.own", b"%d" % k)
    mkdir(b"xattrs/dir_with_xattr")
    os.setxattr(p(b"xattrs/dir_with_xattr"), b"user.dir", b"yes")
    _write(p(b"xattrs/no_xattrs"), b"none\n")
    if IS_ROOT:
        x = p(b"xattrs/privileged")
        _write(x, b"trusted and security\n")
        os.setxattr(x, b"trusted.t", b"trusted-value")
        os.setxattr(x, b"security.s", b"security-value")
        os.setxattr(x, b"user.u", b"user-value")
        os.symlink(b"privileged", p(b"xattrs/symlink_with_xattr"))
        os.setxattr(p(b"xattrs/symlink_with_xattr"), b"trusted.onlink", b"1", follow_symlinks=False)
        os.mkfifo(p(b"xattrs/fifo_with_xattr"))
        os.setxattr(p(b"xattrs/fifo_with_xattr"), b"trusted.fifo", b"f")

    # owners/
    mkdir(b"owners")
    for i, uid in enumerate(UIDS):
        gid = UIDS[(i + 3) % len(UIDS)]
        mode = MODES[i % len(MODES)]
        rel = b"owners/u%d_g%d" % (uid, gid)
        _write(p(rel), b"%d\n" % uid)
        if IS_ROOT:
            owners[rel] = (uid, gid)
        modes[rel] = mode
    for mode in MODES:
        rel = b"owners/mode_%o" % mode
        _write(p(rel), b"")
        modes[rel] = mode
    for mode in (0o1777, 0o2775, 0o700, 0o000):
        rel = b"owners/dir_%o" % mode
        mkdir(rel)
        _write(p(rel + b"/inside"), b"x")
        modes[rel] = mode
    for name, mt in EDGE_MTIMES.items():
        rel = b"owners/" + name
        _write(p(rel), b"")
        mtimes[rel] = mt
    if IS_ROOT:
        os.symlink(b"u0_g65535", p(b"owners/symlink_owned"))
        owners[b"owners/symlink_owned"] = (4242, 4343)

    # names/
    if with_names:
        mkdir(b"names")
        for name in (b"n" * 255, ("\u00e9" * 127 + "x").encode(), b"\xff" * 255, b"\xff\xfe\xfd-not-utf8",
                     b"latin1-caf\xe9", b"with space", b"with\nnewline", b"-leading-dash", b"back\\slash",
                     b'quote"', b"tab\tchar", b"\x01ctrl", b"UPPER", b"upper", b"..."):
            _write(p(b"names/" + name), name)
        mkdir(b"names/" + b"d" * 255)
        _write(p(b"names/" + b"d" * 255 + b"/" + b"f" * 255), b"deep long names")

    # big/
    if big_dir_entries:
        mkdir(b"big")
        for i in range(big_dir_entries):
            rel = b"big/%05d%s" % (i, b"x" * (i % 40))
            _write(p(rel), b"%d\n" % i if i % 4 else b"")
            if IS_ROOT:
                owners[rel] = (10_000 + i % 3000, 20_000 + i % 2500)
        for i in range(3):
            mkdir(b"big/subdir_%d" % i)

    # deep/
    rel = b"deep"
    mkdir(rel)
    for i in range(deep_levels):
        rel += b"/d%03d" % i
        mkdir(rel)
    _write(p(rel + b"/leaf"), b"bottom\n")

    # Ownership, modes, then mtimes bottom-up (creating children changes a directory's mtime).
    for rel, (uid, gid) in owners.items():
        os.chown(p(rel), uid, gid, follow_symlinks=False)
    for rel, mode in modes.items():
        os.chmod(p(rel), mode)
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for name in filenames + dirnames:
            full = os.path.join(dirpath, name)
            relp = os.path.relpath(full, r)
            mt = mtimes.get(relp, _mtime_for(relp))
            os.utime(full, (mt, mt), follow_symlinks=False)
    os.utime(r, (1_600_000_000, 1_600_000_000))


def build_fuzz_seed_tree(root: Path) -> None:
    """A small tree with one of most things, for images that are mutated thousands of times."""
    r = os.fsencode(root)
    os.mkdir(r)
    os.mkdir(os.path.join(r, b"dir"))
    os.mkdir(os.path.join(r, b"dir/sub"))
    os.mkdir(os.path.join(r, b"empty"))
    for i, size in enumerate((0, 1, 100, 4095, 4096, 4097, 3 * 4096 + 11, 20_000)):
        _write(os.path.join(r, b"dir/t%d" % size), text_bytes(size, 300 + i))
    _write(os.path.join(r, b"dir/sub/r9000"), random_bytes(9000, 400))
    _sparse(os.path.join(r, b"sparse"), 64 * KiB, [(20 * KiB, b"x" * 100)])
    os.link(os.path.join(r, b"dir/t100"), os.path.join(r, b"hardlink"))
    os.symlink(b"dir/t100", os.path.join(r, b"symlink"))
    os.symlink(b"/nowhere/" + b"z" * 300, os.path.join(r, b"dangling"))
    os.mkfifo(os.path.join(r, b"fifo"))
    if IS_ROOT:
        os.mknod(os.path.join(r, b"chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(os.path.join(r, b"dir/t1"), 1234, 5678)
    os.setxattr(os.path.join(r, b"dir/t4096"), b"user.k", b"value")
    os.setxattr(os.path.join(r, b"dir"), b"user.big", random_bytes(300, 5))
    for i in range(40):
        _write(os.path.join(r, b"dir/sub/small_%02d" % i), b"s%d" % i)


# ---------------------------------------------------------------------------------------------
# Image building

@dataclass(frozen=True)
class ImageSpec:
    name: str
    builder: str  # "mksquashfs" | "gensquashfs" (--pack-dir) | "gensquashfs-packfile"
    comp: str
    block_size: int
    fragments: str = "default"  # mksquashfs: default|off|always; gensquashfs: default|no-tail
    tree: str = "full"  # "full" | "full+big" (adds the >4 GiB sparse file)
    extra: tuple[str, ...] = ()
    big_dir: int = SMALL_BIG_DIR  # entries in big/

    def __str__(self) -> str:
        return self.name


# Conformance matrix.  Not the cross product (5 compressors x 2 builders x 3 fragment modes x
# block sizes would take hours); instead every factor value appears at least once and the
# factors that interact are paired where they interact:
#  - every compressor is built by BOTH builders (gzip, xz, lzo, lz4, zstd x mksquashfs/gensquashfs);
#  - both block-size extremes (4 KiB, 1 MiB) appear with both builders, and several sizes in
#    between (16, 32, 64... 128 KiB default); DATA_SIZES straddles every one of those sizes, so each
#    image sees reads that cross its own block boundaries;
#  - mksquashfs fragment modes: default (small files only), -no-fragments, -always-use-fragments
#    (tails of big files too), each at a different block size, plus 4 KiB/no-fragments where
#    every tail is a short last block; gensquashfs: tail packing (its default) and
#    --no-tail-packing;
#  - uncompressed metadata/data/fragments/xattrs (-noI -noD -noF -noX), with and without an
#    export table, and hard links through a gensquashfs pack file (gensquashfs --pack-dir does
#    not keep hard links; that image has no xattr table, see write_pack_file);
#  - the > 4 GiB sparse file in one image per builder (cheap to build, but reading 4 GiB through
#    two mounts costs ~20-40 s per image); smaller sparse files are in all of them;
#  - the 20,000-entry directory in three images (both builders, fragments and tail packing,
#    three compressors): it dominates build and comparison time (tens of seconds per image
#    through FUSE), and directory and inode tables are laid out the same way whatever the
#    compressor or block size.  The other images hold 3,000 entries there, which still spans
#    many directory headers, metadata blocks and more than 2,048 distinct uids/gids.
MATRIX: list[ImageSpec] = [
    ImageSpec("mk-gzip-128k-frag-big", "mksquashfs", "gzip", 128 * KiB, "default", "full+big",
              big_dir=BIG_DIR_ENTRIES),
    ImageSpec("mk-xz-4k-nofrag", "mksquashfs", "xz", 4 * KiB, "off"),
    ImageSpec("mk-lzo-1m-always", "mksquashfs", "lzo", MiB, "always"),
    ImageSpec("mk-lz4-32k-always", "mksquashfs", "lz4", 32 * KiB, "always", extra=("-Xhc",)),
    ImageSpec("mk-zstd-1m-nofrag", "mksquashfs", "zstd", MiB, "off", extra=("-no-exports",)),
    ImageSpec("mk-gzip-16k-uncompressed", "mksquashfs", "gzip", 16 * KiB, "default",
              extra=("-noI", "-noD", "-noF", "-noX", "-no-duplicates")),
    ImageSpec("gen-gzip-4k", "gensquashfs", "gzip", 4 * KiB),
    ImageSpec("gen-xz-1m-notail", "gensquashfs", "xz", MiB, "no-tail"),
    ImageSpec("gen-lzo-128k-export", "gensquashfs", "lzo", 128 * KiB, extra=("--exportable",)),
    ImageSpec("gen-lz4-16k", "gensquashfs", "lz4", 16 * KiB, big_dir=BIG_DIR_ENTRIES),
    ImageSpec("gen-zstd-128k-packfile-big", "gensquashfs-packfile", "zstd", 128 * KiB, "default", "full+big",
              big_dir=BIG_DIR_ENTRIES),
]


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-2000:]}")


def _quote_pack(path: bytes) -> str:
    try:
        s = path.decode()
    except UnicodeDecodeError:
        raise ValueError(f"cannot express {path!r} in a pack file") from None
    if any(c in s for c in '"\\\n'):
        raise ValueError(f"cannot express {path!r} in a pack file")
    return f'"{s}"'


def _walk_rel(r: bytes) -> Iterator[bytes]:
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(os.path.join(r, rel) if rel else r)):
            child = os.path.join(rel, name) if rel else name
            yield child
            if stat.S_ISDIR(os.lstat(os.path.join(r, child)).st_mode):
                stack.append(child)


def write_pack_file(src: Path, pack_file: Path) -> None:
    """Describe `src` as a gensquashfs pack file (hard links as `link`).

    Paths that a pack file cannot express (non-UTF-8, quotes, newlines) are left out; the names/
    directory is therefore built without them for this builder.  No xattrs: gensquashfs 1.2's
    --xattr-file left the image without an xattr table in every form we tried, so the pack-file
    image has none (the other images cover xattrs).  Pack files carry no mtimes either."""
    r = os.fsencode(src)
    lines: list[str] = []
    first_by_ino: dict[int, bytes] = {}
    for rel in _walk_rel(r):
        full = os.path.join(r, rel)
        st = os.lstat(full)
        q = _quote_pack(b"/" + rel)
        if stat.S_ISLNK(st.st_mode):
            try:
                _quote_pack(os.readlink(full))
            except ValueError:
                continue
        own = f"{stat.S_IMODE(st.st_mode):o} {st.st_uid} {st.st_gid}"
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            if st.st_ino in first_by_ino:
                lines.append(f"link {q} 0 0 0 /{first_by_ino[st.st_ino].decode()}")
                continue
            first_by_ino[st.st_ino] = rel
        if stat.S_ISDIR(st.st_mode):
            lines.append(f"dir {q} {own}")
        elif stat.S_ISREG(st.st_mode):
            lines.append(f"file {q} {own} {rel.decode()}")
        elif stat.S_ISLNK(st.st_mode):
            lines.append(f"slink {q} {own} {os.readlink(full).decode()}")
        elif stat.S_ISFIFO(st.st_mode):
            lines.append(f"pipe {q} {own}")
        elif stat.S_ISSOCK(st.st_mode):
            lines.append(f"sock {q} {own}")
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            lines.append(f"nod {q} {own} {kind} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
    pack_file.write_text("\n".join(lines) + "\n")


def tree_options(spec: ImageSpec) -> dict[str, object]:
    """The build_full_tree arguments for the source tree of `spec`."""
    return {"big_sparse": spec.tree == "full+big", "with_names": spec.builder != "gensquashfs-packfile",
            "big_dir_entries": spec.big_dir}


def build_image(spec: ImageSpec, src: Path, out: Path) -> Path:
    """Pack `src` into `out` as `spec` says; returns `out`."""
    if spec.builder == "mksquashfs":
        cmd = ["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress",
               "-comp", spec.comp, "-b", str(spec.block_size), "-processors", "2"]
        cmd += {"default": [], "off": ["-no-fragments"], "always": ["-always-use-fragments"]}[spec.fragments]
        cmd += list(spec.extra)
        _run(cmd)
    elif spec.builder in ("gensquashfs", "gensquashfs-packfile"):
        cmd = ["gensquashfs", "-q", "-f", "-c", spec.comp, "-b", str(spec.block_size), "-j", "2"]
        if spec.fragments == "no-tail":
            cmd.append("--no-tail-packing")
        cmd += list(spec.extra)
        if spec.builder == "gensquashfs":
            cmd += ["-D", str(src), "--keep-time", "--keep-xattr"]
        else:
            pack = out.with_suffix(".pack")
            write_pack_file(src, pack)
            cmd += ["-F", str(pack), "-D", str(src), "-d", "mtime=1234567890"]
        cmd.append(str(out))
        _run(cmd)
    else:
        raise ValueError(spec.builder)
    return out


# ---------------------------------------------------------------------------------------------
# Superblock

SUPERBLOCK_FORMAT = "<IIIIIHHHHHHQQQQQQQQ"
SUPERBLOCK_FIELDS = ("magic", "inode_count", "mod_time", "block_size", "fragment_count", "compression",
                     "block_log", "flags", "id_count", "version_major", "version_minor", "root_inode",
                     "bytes_used", "id_table_start", "xattr_id_table_start", "inode_table_start",
                     "directory_table_start", "fragment_table_start", "export_table_start")
SUPERBLOCK_SIZE = struct.calcsize(SUPERBLOCK_FORMAT)  # 96
NO_TABLE = 0xFFFF_FFFF_FFFF_FFFF


def read_superblock(data: bytes | Path) -> dict[str, int]:
    if isinstance(data, Path):
        with open(data, "rb") as f:
            data = f.read(SUPERBLOCK_SIZE)
    return dict(zip(SUPERBLOCK_FIELDS, struct.unpack_from(SUPERBLOCK_FORMAT, data), strict=True))


def field_offset(name: str) -> tuple[int, int]:
    """(byte offset, size) of a superblock field."""
    off = 0
    for fname, code in zip(SUPERBLOCK_FIELDS, SUPERBLOCK_FORMAT[1:], strict=True):
        size = struct.calcsize("<" + code)
        if fname == name:
            return off, size
        off += size
    raise KeyError(name)


def set_superblock_field(data: bytearray, name: str, value: int) -> None:
    off, size = field_offset(name)
    data[off:off + size] = value.to_bytes(size, "little")


# ---------------------------------------------------------------------------------------------
# Locating structures, so damage can be aimed (gzip or uncompressed metadata only)

@dataclass(frozen=True)
class MetaBlock:
    offset: int  # of the 2-byte header
    size: int  # of the stored payload
    compressed: bool

    @property
    def payload(self) -> slice:
        return slice(self.offset + 2, self.offset + 2 + self.size)


def metadata_blocks(data: bytes | bytearray, start: int, end: int) -> list[MetaBlock]:
    """The metadata blocks stored back to back in [start, end)."""
    out = []
    pos = start
    while pos + 2 <= end:
        head = int.from_bytes(data[pos:pos + 2], "little")
        size = head & 0x7FFF
        out.append(MetaBlock(pos, size, not head & 0x8000))
        pos += 2 + size
    return out


def unpack_meta(data: bytes | bytearray, block: MetaBlock) -> bytes:
    raw = data[block.payload]
    return zlib.decompress(raw) if block.compressed else bytes(raw)


def fragment_table(data: bytes) -> list[tuple[int, int]]:
    """(start, size word) of every fragment block (gzip or uncompressed metadata)."""
    sb = read_superblock(data)
    count = sb["fragment_count"]
    out: list[tuple[int, int]] = []
    ptr = sb["fragment_table_start"]
    while len(out) < count:
        block_at = int.from_bytes(data[ptr:ptr + 8], "little")
        head = int.from_bytes(data[block_at:block_at + 2], "little")
        blk = unpack_meta(data, MetaBlock(block_at, head & 0x7FFF, not head & 0x8000))
        for i in range(0, len(blk), 16):
            start, size, _ = struct.unpack_from("<QII", blk, i)
            out.append((start, size))
        ptr += 8
    return out[:count]


def root_inode_location(data: bytes) -> tuple[MetaBlock, int]:
    """(inode-table block holding the root inode, the root directory's directory-table block offset)."""
    sb = read_superblock(data)
    ref = sb["root_inode"]
    blocks = metadata_blocks(data, sb["inode_table_start"], sb["directory_table_start"])
    by_rel = {b.offset - sb["inode_table_start"]: i for i, b in enumerate(blocks)}
    i = by_rel[ref >> 16]
    raw = b"".join(unpack_meta(data, b) for b in blocks[i:i + 2])
    off = ref & 0xFFFF
    itype = struct.unpack_from("<H", raw, off)[0]
    if itype == 1:  # basic directory: start_block u32 after the 16-byte common header
        dir_block = struct.unpack_from("<I", raw, off + 16)[0]
    elif itype == 8:  # extended directory: nlink, file_size, start_block
        dir_block = struct.unpack_from("<I", raw, off + 24)[0]
    else:
        raise ValueError(f"root inode has type {itype}")
    return blocks[i], dir_block
