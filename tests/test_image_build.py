"""`scratchfs image build`: real mksquashfs/gensquashfs builds of real trees, and the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from scratchfs import cli
from scratchfs.image import build as buildmod
from scratchfs.image.manifest import (
    CHUNK,
    ManifestError,
    check_image,
    image_checksum,
    image_matches,
    manifest_path,
    read_manifest,
)
from scratchfs.image.progress import Reporter, Snapshot, eta, format_bar, format_duration, format_line
from scratchfs.image.sample import generate_sample_tree
from scratchfs.image.scan import Excluder, choose_block_size, scan_source
from scratchfs.squashfs import Image
from tests.mounts import wait_for

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_cli(*argv: str) -> int:
    return cli.main(["image", *argv])


def tree_digest(root: Path) -> str:
    """Names, types, modes, mtimes, link targets and contents of a tree, as one hash."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(os.fsencode(p.relative_to(root)) + b"\0%o %d" % (st.st_mode, int(st.st_mtime)))
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
    return h.hexdigest()


def image_entries(image: Path) -> dict[bytes, tuple[int, int]]:
    """path → (mode, size) of every entry, read back with our reader."""
    with Image.open(image) as img:
        return {p: (ino.mode, ino.size) for p, ino in img.walk() if p}


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "tree"
    generate_sample_tree(root, n_small=80, n_large=2, large_size=3 << 20, seed=7)
    return root


# ---------------------------------------------------------------- sample tree


def test_sample_tree_is_deterministic_and_has_the_odd_entries(tmp_path: Path) -> None:
    a = generate_sample_tree(tmp_path / "a", n_small=30, n_large=1, large_size=1 << 20, seed=3)
    b = generate_sample_tree(tmp_path / "b", n_small=30, n_large=1, large_size=1 << 20, seed=3)
    generate_sample_tree(tmp_path / "c", n_small=30, n_large=1, large_size=1 << 20, seed=4)
    assert a == b
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    meta = tmp_path / "a" / "meta"
    assert (meta / "empty.dat").stat().st_size == 0
    assert list((meta / "empty_dir").iterdir()) == []
    assert os.readlink(meta / "README.symlink") == "README"
    assert (meta / "README").stat().st_ino == (meta / "README.hardlink").stat().st_ino
    sizes = [p.stat().st_size for p in (tmp_path / "a").rglob("item*")]
    assert len(sizes) == 30 and all(4096 <= s <= 65536 for s in sizes)
    # half text-like (compresses well), half random (does not)
    import zlib

    txt = next((tmp_path / "a").rglob("*.txt")).read_bytes()
    bn = next((tmp_path / "a").rglob("*.bin")).read_bytes()
    assert len(zlib.compress(txt)) < len(txt) / 2
    assert len(zlib.compress(bn)) > len(bn) * 0.99


# ---------------------------------------------------------------- pure parts


def test_choose_block_size_follows_where_the_bytes_are() -> None:
    assert choose_block_size([]) == 1 << 20
    assert choose_block_size([10 << 30, 4096]) == 1 << 20
    assert choose_block_size([4096] * 1000) == 128 << 10
    assert choose_block_size([300 << 10] * 10) == 512 << 10
    # most bytes in small files, a few big ones: small blocks
    assert choose_block_size([50 << 10] * 1000 + [1 << 20] * 10) == 128 << 10


def test_excluder_names_and_paths() -> None:
    ex = Excluder(["*.tmp", "cache", "/data/raw/*", b"odd\xff*"])
    assert ex.excluded(b"a/b/x.tmp") and ex.excluded(b"x.tmp")
    assert ex.excluded(b"deep/cache") and not ex.excluded(b"deep/cachex")
    assert ex.excluded(b"data/raw/1") and not ex.excluded(b"other/data/raw/1")
    assert ex.excluded(b"d/odd\xffname")
    assert not Excluder([])


def test_escape_wildcard_escapes_everything_special() -> None:
    assert buildmod.escape_wildcard(b"a/b c*[x]") == b"a/b\\ c\\*\\[x\\]"
    assert buildmod.escape_wildcard(b"\xff?") == b"\\\xff\\?"


def test_progress_formatting_is_pure() -> None:
    s = Snapshot(files_done=10, files_total=40, bytes_done=25 << 20, bytes_total=100 << 20, elapsed=5.0)
    assert eta(s) == pytest.approx(15.0)
    assert "10/40 files" in format_line(s, "build") and "25%" in format_line(s)
    assert "ETA 00:15" in format_bar(s)
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "--:--"
    assert eta(Snapshot(0, 1, 0, 100, 0.0)) is None


def test_reporter_draws_a_bar_on_a_tty_and_logs_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    buf = io.StringIO()
    r = Reporter("build", stream=buf, tty=True, bar_interval=1.0)
    s = Snapshot(1, 2, 10, 20, 1.0)
    r.update(s, now=100.0)
    r.update(s, now=100.5)  # too soon: not drawn again
    r.update(s, now=101.2)
    r.finish(s)
    assert buf.getvalue().count("\r") == 3 and buf.getvalue().endswith("\n")
    caplog.set_level(logging.INFO, logger="scratchfs.image.progress")
    r2 = Reporter("build", stream=io.StringIO(), tty=False, log_interval=10.0)
    r2.update(s, now=0.0)  # the first line comes one interval later
    r2.update(s, now=5.0)
    r2.update(s, now=10.0)
    r2.update(s, now=21.0)
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 2 and all("1/2 files" in ln for ln in lines)


# ---------------------------------------------------------------- building


def test_build_writes_image_and_manifest(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.sqfs"
    assert run_cli("build", str(sample), str(out)) == 0
    assert leftovers(tmp_path) == []
    m = read_manifest(out)
    assert m is not None
    scan = scan_source(os.fsencode(sample))
    assert m.counts == {"files": 84, "dirs": scan.dirs, "symlinks": 1, "hardlinks": 1, "other": 0}
    assert m.logical_bytes == scan.logical_bytes
    assert m.image_bytes == out.stat().st_size
    assert m.tool["name"] == "mksquashfs" and m.tool["version"] == "4.5.1"
    assert m.options["compression"] == "zstd" and m.options["level"] == 3
    assert m.checksum == image_checksum(out)
    assert check_image(out, full=True).ok and image_matches(out)
    # the real tool agrees on what is inside
    sb = subprocess.run(["unsquashfs", "-s", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Compression zstd" in sb and "not exportable" in sb
    listed = subprocess.run(["unsquashfs", "-l", str(out)], capture_output=True, text=True, check=True).stdout
    assert "squashfs-root/meta/README.symlink" in listed and "squashfs-root/meta/empty_dir" in listed
    ents = image_entries(out)
    assert ents[b"meta/empty.dat"][1] == 0
    assert ents[b"large/large00.txt"][1] == 3 << 20


def test_checksum_is_a_tree_of_xxh3_and_old_sha256_trees_still_compute(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(CHUNK * 2 + 12345)
    p.write_bytes(data)
    pieces = [xxhash.xxh3_128(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)]
    assert image_checksum(p) == xxhash.xxh3_128(b"".join(pieces)).hexdigest()
    assert image_checksum(p, threads=1) == image_checksum(p, threads=3)
    old = [hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)]
    assert image_checksum(p, algorithm="sha256-tree") == hashlib.sha256(b"".join(old)).hexdigest()


def test_a_manifest_with_the_older_sha256_tree_checksum_is_still_checked(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "old.sqfs"
    assert run_cli("build", str(sample), str(out)) == 0
    mpath = manifest_path(out)
    doc = json.loads(mpath.read_text())
    doc["image"]["checksum_algorithm"] = "sha256-tree"
    doc["image"]["checksum"] = image_checksum(out, algorithm="sha256-tree")
    mpath.write_text(json.dumps(doc))
    r = check_image(out, full=True)
    assert r.ok and r.checksum_checked
    doc["image"]["checksum"] = "0" * 64
    mpath.write_text(json.dumps(doc))
    r = check_image(out, full=True)
    assert not r.ok and "checksum" in r.problems[0]


def test_manifest_check_detects_replaced_and_damaged_images(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.sqfs"
    assert run_cli("build", str(sample), str(out)) == 0
    st = out.stat()
    # damage one byte in the middle, keep size and mtime: only the full check sees it
    with open(out, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_image(out).ok
    r = check_image(out, full=True)
    assert not r.ok and r.checksum_checked and "checksum" in r.problems[0]
    # touched: mtime differs
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not check_image(out).ok
    # replaced by another image
    other = tmp_path / "other.sqfs"
    assert run_cli("build", "--compression", "gzip", str(sample), str(other)) == 0
    os.replace(other, out)
    r = check_image(out)
    assert not r.ok and any("superblock" in p or "size" in p for p in r.problems)
    # unusable manifest: a clear error; matches() says no
    manifest_path(out).write_text("{not json")
    with pytest.raises(ManifestError):
        read_manifest(out)
    assert not image_matches(out)


def test_existing_output_needs_force(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds.sqfs"
    out.write_bytes(b"precious")
    assert run_cli("build", str(sample), str(out)) == 2
    assert out.read_bytes() == b"precious"
    assert "--force" in capsys.readouterr().err
    assert run_cli("build", "--force", "--compression", "lz4", str(sample), str(out)) == 0
    with Image.open(out) as img:
        assert img.info.compression == "lz4"
    assert check_image(out, full=True).ok
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "case, code",
    [("missing", 3), ("file", 2), ("inside", 2), ("no-parent", 3), ("bad-block", 2), ("bad-level", 2)],
)
def test_bad_input_is_one_line_with_its_exit_code(
    case: str, code: int, sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = str(sample), str(tmp_path / "o.sqfs")
    extra: list[str] = []
    if case == "missing":
        src = str(tmp_path / "nope")
    elif case == "file":
        src = str(next(sample.rglob("*.txt")))
    elif case == "inside":
        inner = tmp_path / "src"
        shutil.copytree(sample / "meta", inner, symlinks=True)
        src, out = str(inner), str(inner / "empty_dir" / ".." / "empty_dir" / "o.sqfs")
    elif case == "no-parent":
        out = str(tmp_path / "no" / "o.sqfs")
    elif case == "bad-block":
        extra = ["--block-size", "3M"]
    elif case == "bad-level":
        extra = ["--compression", "xz", "--level", "5"]
    before = sorted(os.listdir(tmp_path))
    assert run_cli("build", *extra, src, out) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scratchfs: error: ")
    assert sorted(os.listdir(tmp_path)) == before
    if case == "inside":
        assert not (tmp_path / "src" / "empty_dir" / "o.sqfs").exists()


def test_missing_builder_is_an_environment_error_and_gensquashfs_is_the_fallback(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    out = tmp_path / "o.sqfs"
    assert run_cli("build", str(sample), str(out)) == 7
    assert "mksquashfs not found" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
    # with only gensquashfs on PATH the build uses it
    os.symlink(shutil.which("gensquashfs", path="/usr/bin:/usr/local/bin") or "/usr/bin/gensquashfs",
               bindir / "gensquashfs")
    assert run_cli("build", str(sample), str(out)) == 0
    m = read_manifest(out)
    assert m is not None and m.tool["name"] == "gensquashfs"
    ents = image_entries(out)
    assert ents[b"large/large01.bin"][1] == 3 << 20 and b"meta/empty_dir" in ents
    # asking for mksquashfs explicitly when it is missing
    assert run_cli("build", "--force", "--tool", "mksquashfs", str(sample), str(out)) == 7


def test_excludes_normalize_and_all_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "keep" / "cache").mkdir(parents=True)
    (src / "data" / "raw").mkdir(parents=True)
    (src / "keep" / "a.txt").write_text("a")
    (src / "keep" / "b.tmp").write_text("b")
    (src / "keep" / "cache" / "c").write_text("c")
    (src / "data" / "raw" / "r1").write_text("r")
    (src / "data" / "kept").write_text("k")
    (src / "we*ird [x]").write_text("w")
    (src / "we-ird x").write_text("w2")
    os.chmod(src / "keep" / "a.txt", 0o600)
    os.chmod(src / "data", 0o700)
    os.chown(src / "data" / "kept", 1234, 5678)
    out = tmp_path / "o.sqfs"
    args = ["build", "--exclude", "*.tmp", "--exclude", "cache", "--exclude", "/data/raw",
            "--exclude", "we[*]ird*", "--normalize-permissions", "--all-root", str(src), str(out)]
    assert run_cli(*args) == 0
    with Image.open(out) as img:
        ents = {p: ino for p, ino in img.walk()}
    assert set(ents) == {b"", b"keep", b"keep/a.txt", b"data", b"data/kept", b"we-ird x"}
    for p, ino in ents.items():
        assert stat.S_IMODE(ino.mode) == (0o755 if ino.is_dir else 0o644), p
        assert ino.uid == 0 and ino.gid == 0
    # the source is untouched
    assert stat.S_IMODE((src / "keep" / "a.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((src / "data").stat().st_mode) == 0o700
    m = read_manifest(out)
    assert m is not None and m.options["excludes"] == ["*.tmp", "cache", "/data/raw", "we[*]ird*"]
    assert m.counts["files"] == 3


def test_reproducible_builds_are_byte_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate_sample_tree(a, n_small=40, n_large=1, large_size=1 << 20, seed=5)
    generate_sample_tree(b, n_small=40, n_large=1, large_size=1 << 20, seed=5)
    assert run_cli("build", "--reproducible", str(a), str(tmp_path / "a.sqfs")) == 0
    assert run_cli("build", "--reproducible", "--threads", "1", str(b), str(tmp_path / "b.sqfs")) == 0
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()
    with Image.open(tmp_path / "a.sqfs") as img:
        assert img.info.mkfs_time == max(int(p.lstat().st_mtime) for p in [a, *a.rglob("*")])


def test_progress_lines_when_not_on_a_terminal(sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rep = Reporter("build", stream=io.StringIO(), tty=False, log_interval=0.0)
    res = buildmod.build_image(sample, tmp_path / "o.sqfs", buildmod.BuildOptions(level=9), reporter=rep,
                               poll_interval=0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "scratchfs.image.progress"]
    assert lines, "no progress lines were logged"
    assert lines[-1].startswith(f"build: {res.scan.files}/{res.scan.files} files")
    assert all(" files, " in ln and "/s, ETA" in ln for ln in lines)


# ---------------------------------------------------------------- failures leave nothing behind


@contextlib.contextmanager
def world_readable_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="scratchfs-image-test-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the enclosed code (and the builder it starts) with the effective ids of nobody.

    Everything the command imports is imported first: nobody cannot read root's Python."""
    cli.build_parser()
    import scratchfs.image.build  # noqa: F401
    import scratchfs.image.progress  # noqa: F401

    groups = os.getgroups()
    os.setgroups([])
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the build as another user")
def test_unreadable_entries_are_all_reported_and_fail_unless_skipped(capsys: pytest.CaptureFixture[str],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with world_readable_dir() as d:
        src = d / "src"
        (src / "locked").mkdir(parents=True)
        (src / "ok.txt").write_text("fine")
        (src / "secret1").write_text("s1")
        (src / "secret2").write_text("s2")
        (src / "locked" / "inner").write_text("i")
        for p in (src / "secret1", src / "secret2", src / "locked"):
            os.chmod(p, 0)
        outdir = d / "out"
        outdir.mkdir()
        os.chown(outdir, 65534, 65534)
        out = outdir / "o.sqfs"
        with as_nobody():
            rc = run_cli("build", str(src), str(out))
        assert rc == 6
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for name in ("secret1", "secret2", "locked"):
            assert f"unreadable: {name}" in logged
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("scratchfs: error: 3 unreadable entries")
        assert os.listdir(outdir) == []
        with as_nobody():
            rc = run_cli("build", "--skip-unreadable", str(src), str(out))
        assert rc == 0
        with Image.open(out) as img:
            assert {q for q, _ in img.walk()} == {b"", b"ok.txt"}


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_no_space_left_is_exit_8_and_leaves_nothing(sample: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        assert run_cli("build", str(sample), str(small / "o.sqfs")) == 8
        assert "no space left" in capsys.readouterr().err
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough text data that a level-19 zstd build runs for a good while."""
    root = tmp_path_factory.mktemp("slow") / "tree"
    generate_sample_tree(root, n_small=20, n_large=2, large_size=16 << 20, seed=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_leaves_no_file_under_the_final_name(sig: int, slow_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.sqfs"
    proc = subprocess.Popen(
        [PY, "-m", "scratchfs.cli", "image", "build", "--level", "19", str(slow_tree), str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        # wait until mksquashfs runs and has written part of the temp file
        child = wait_for(lambda: _children(proc.pid), "mksquashfs to start", 60, interval=0.02)[0]
        wait_for(lambda: any((tmp_path / n).stat().st_size > (1 << 20) for n in leftovers(tmp_path)),
                 "the temp image to grow", 120, interval=0.02)  # fmt: skip
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and not manifest_path(out).exists()
    # the builder does not outlive the command
    wait_for(lambda: not _alive(child), "mksquashfs to exit", 30, interval=0.02)
    if sig == signal.SIGTERM:
        assert rc == 130
        assert leftovers(tmp_path) == []  # removed on the way out
    else:
        assert rc == -signal.SIGKILL
        assert len(leftovers(tmp_path)) == 1  # SIGKILL leaves the temp file, never the final name
        # the next build warns about it, does not touch it, and succeeds
        left = leftovers(tmp_path)[0]
        p = subprocess.run([PY, "-m", "scratchfs.cli", "image", "build", "--json", str(slow_tree / "meta"), str(out)],
                           capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, p.stderr
        assert f"leftover temp file {tmp_path / left}" in p.stderr and "gone" in p.stderr
        assert json.loads(p.stdout)["image"]["name"] == "o.sqfs"
        assert leftovers(tmp_path) == [left]


def _deny_acl(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format) for a 0644 file that denies one user."""
    import struct

    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 0, uid), (0x04, 4, undefined), (0x10, 4, undefined), (0x20, 4, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the build as another user")
def test_unreadable_files_only_the_builder_notices_are_caught_too(capsys: pytest.CaptureFixture[str]) -> None:
    """The mode bits say readable, an ACL says no: the pre-scan passes it, mksquashfs cannot read
    it and says so; the build still fails (or, with --skip-unreadable, warns)."""
    with world_readable_dir() as d:
        src = d / "src"
        src.mkdir()
        (src / "ok.txt").write_text("fine")
        acl = src / "acl-denied.txt"
        acl.write_text("denied by an ACL")
        os.chmod(acl, 0o644)
        try:
            os.setxattr(acl, "system.posix_acl_access", _deny_acl(65534))
        except OSError as e:
            pytest.skip(f"no POSIX ACLs on this filesystem: {e}")
        outdir = d / "out"
        outdir.mkdir()
        os.chown(outdir, 65534, 65534)
        out = outdir / "o.sqfs"
        with as_nobody():
            assert not os.access(acl, os.R_OK, effective_ids=True)
            rc = run_cli("build", str(src), str(out))
        assert rc == 6
        assert "could not be read" in capsys.readouterr().err
        assert os.listdir(outdir) == []
        with as_nobody():
            assert run_cli("build", "--skip-unreadable", str(src), str(out)) == 0
        with Image.open(out) as img:
            assert img.resolve("acl-denied.txt").size == 0  # mksquashfs stores it empty
