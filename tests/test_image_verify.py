"""`scratchfs image inspect` and `verify`: real images of awkward trees, built by our command."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from scratchfs import cli
from scratchfs.image.manifest import manifest_path, read_manifest
from scratchfs.image.verify import verify_image
from scratchfs.squashfs import Image

COMPRESSIONS = ["zstd", "gzip", "xz", "lz4", "lzo"]
BS = 128 << 10


def run_cli(*argv: str) -> int:
    return cli.main(["image", *argv])


def make_awkward_tree(root: Path) -> None:
    """Empty files and dirs, symlinks, hard links, non-UTF-8 and 255-byte names, deep nesting,
    sizes around block boundaries, a fifo, odd modes and an xattr."""
    root.mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "empty_file").write_bytes(b"")
    sizes = {"one": 1, "bs-1": BS - 1, "bs": BS, "bs+1": BS + 1, "multi": 3 * BS + 777, "big": 5 << 20}
    sizedir = root / "sizes"
    sizedir.mkdir()
    for i, (name, n) in enumerate(sizes.items()):
        pattern = (f"{name} line {i}\n" * (n // 8 + 1)).encode()[: n // 2] + os.urandom(n - n // 2)
        (sizedir / name).write_bytes(pattern)
    (root / "links").mkdir()
    (root / "links" / "target.txt").write_text("hard link target\n")
    os.link(root / "links" / "target.txt", root / "links" / "hard.txt")
    os.symlink("target.txt", root / "links" / "rel")
    os.symlink("/nonexistent/abs/path", root / "links" / "dangling")
    os.symlink("../sizes", root / "links" / "dirlink")
    odd = os.fsencode(root) + b"/caf\xe9-\xff\xfe"
    with open(odd, "wb") as f:
        f.write(b"latin-1 name\n")
    os.mkdir(os.fsencode(root) + b"/dir-\x80\x81")
    with open(os.fsencode(root) + b"/dir-\x80\x81/inner", "wb") as f:
        f.write(b"inside a non-utf8 dir\n")
    (root / ("L" * 255)).write_text("255-byte name\n")
    (root / ("d" * 255)).mkdir()
    (root / ("d" * 255) / ("f" * 255)).write_text("255 in 255\n")
    deep = root / "deep"
    for i in range(60):
        deep = deep / f"level{i:02d}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("at the bottom\n")
    (root / "names with spaces & *stars* [brackets]").write_text("x\n")
    os.mkfifo(root / "a_fifo")
    (root / "private").mkdir()
    (root / "private" / "secret.txt").write_text("0600\n")
    os.chmod(root / "private" / "secret.txt", 0o600)
    os.chmod(root / "private", 0o700)
    (root / "script.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "script.sh", 0o755)
    os.setxattr(root / "empty_file", "user.scratchfs", b"tagged")


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("awkward") / "tree"
    make_awkward_tree(root)
    return root


def problems_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("comp", COMPRESSIONS)
def test_each_compression_verifies_against_its_source_and_catches_a_change(
    comp: str, awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-a", str(awkward), str(src)], check=True)  # keeps hard links, fifo, xattrs, odd names
    out = tmp_path / f"{comp}.sqfs"
    assert run_cli("build", "--compression", comp, str(src), str(out)) == 0
    capsys.readouterr()
    assert run_cli("verify", str(out)) == 0
    assert run_cli("verify", "--against", str(src), str(out)) == 0
    lines = problems_of(capsys)
    assert lines[-1].startswith("OK: ") and "matches" in lines[-1]
    with Image.open(out) as img:
        assert img.info.compression == comp
    # change one byte in the middle of a multi-block file, same size and mtime
    victim = src / "sizes" / "multi"
    st = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(2 * BS + 5)
        b = f.read(1)
        f.seek(2 * BS + 5)
        f.write(bytes([b[0] ^ 1]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_cli("verify", "--against", str(src), str(out)) == 1
    lines = problems_of(capsys)
    assert f"content differs: sizes/multi (first difference at byte {2 * BS + 5})" in lines
    assert lines[-1].startswith("FAILED: 1 problem;")


def test_every_kind_of_difference_is_named(awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-a", str(awkward), str(src)], check=True)
    out = tmp_path / "o.sqfs"
    assert run_cli("build", str(src), str(out)) == 0
    (src / "new_in_source").write_text("new")
    (src / "empty_file").unlink()
    (src / "sizes" / "one").write_bytes(b"xy")
    os.chmod(src / "script.sh", 0o700)
    os.unlink(src / "links" / "rel")
    os.symlink("elsewhere", src / "links" / "rel")
    (src / "empty_dir").rmdir()
    (src / "empty_dir").write_text("now a file")
    with open(os.fsencode(src) + b"/caf\xe9-\xff\xfe", "wb") as f:
        f.write(b"LATIN-1 NAME\n")
    shutil.rmtree(src / "deep")  # a whole subtree gone: named once, at its top
    (src / "newdir" / "sub").mkdir(parents=True)
    (src / "newdir" / "sub" / "f").write_text("new")
    capsys.readouterr()
    assert run_cli("verify", "--json", "--against", str(src), str(out)) == 1
    res = json.loads(capsys.readouterr().out)
    got = {(p["kind"], p["path"]) for p in res["problems"]}
    assert got == {
        ("only-in-source", "new_in_source"),
        ("only-in-image", "empty_file"),
        ("size", "sizes/one"),
        ("mode", "script.sh"),
        ("symlink", "links/rel"),
        ("type", "empty_dir"),
        ("content", "caf\\xe9-\\xff\\xfe"),
        ("only-in-image", "deep"),
        ("only-in-source", "newdir"),
    }
    assert res["ok"] is False


def test_normalized_and_excluded_builds_verify_through_the_manifest(
    awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "n.sqfs"
    assert run_cli("build", "--normalize-permissions", "--exclude", "deep", "--exclude", "*.sh",
                   str(awkward), str(out)) == 0
    assert run_cli("verify", "--against", str(awkward), str(out)) == 0
    # without the manifest the same image differs in modes and misses the excluded entries
    manifest_path(out).unlink()
    capsys.readouterr()
    assert run_cli("verify", "--against", str(awkward), str(out)) == 1
    lines = problems_of(capsys)
    assert "mode differs: private/secret.txt (source 0600, image 0644)" in lines
    assert "mode differs: private (source 0700, image 0755)" in lines
    assert "only in source: script.sh" in lines and "only in source: deep" in lines


def test_corrupt_data_block_is_reported_by_name(awkward: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.sqfs"
    assert run_cli("build", "--block-size", "128K", str(awkward), str(out)) == 0
    with Image.open(out) as img:
        ino = img.resolve("sizes/big")
        off = ino.block_offsets[1]
    with open(out, "r+b") as f:  # wreck the start of the second compressed block of sizes/big
        f.seek(off)
        f.write(b"\0" * 16)
    capsys.readouterr()
    assert run_cli("verify", str(out)) == 1
    lines = problems_of(capsys)
    assert any(ln.startswith(f"does not decode: sizes/big (at byte {BS}") for ln in lines), lines
    assert lines[-1].startswith("FAILED: 1 problem;")


def test_gensquashfs_image_verifies_with_a_note_about_hard_links(awkward: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.sqfs"
    assert run_cli("build", "--tool", "gensquashfs", str(awkward), str(out)) == 0
    capsys.readouterr()
    assert run_cli("verify", "--against", str(awkward), str(out)) == 0
    lines = problems_of(capsys)
    assert "note: hard link not kept: links/target.txt is a separate file in the image" in lines or \
        "note: hard link not kept: links/hard.txt is a separate file in the image" in lines


def test_verify_in_process_counts_and_threads(awkward: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.sqfs"
    assert run_cli("build", str(awkward), str(out)) == 0
    one = verify_image(out, against=awkward, threads=1)
    many = verify_image(out, against=awkward, threads=4)
    assert one.ok and many.ok
    m = read_manifest(out)
    assert m is not None
    assert (one.dirs, one.symlinks, one.other) == (m.counts["dirs"], m.counts["symlinks"], m.counts["other"]) == \
        (many.dirs, many.symlinks, many.other)
    assert one.bytes_read == many.bytes_read
    # hard-linked data (one inode in the image, one in the source) is read once
    assert one.files == many.files == m.counts["files"]
    assert one.bytes_read == m.logical_bytes


def test_inspect_reports_the_image(awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "i.sqfs"
    assert run_cli("build", "--compression", "gzip", "--block-size", "256K", str(awkward), str(out)) == 0
    capsys.readouterr()
    assert run_cli("inspect", "--json", str(out)) == 0
    r = json.loads(capsys.readouterr().out)
    m = read_manifest(out)
    assert m is not None
    assert r["compression"] == "gzip" and r["block_size"] == 256 << 10
    assert (r["files"], r["dirs"], r["symlinks"], r["other"], r["hardlinks"]) == (
        m.counts["files"], m.counts["dirs"], m.counts["symlinks"], m.counts["other"], m.counts["hardlinks"])
    assert r["logical_bytes"] == m.logical_bytes
    assert r["bytes_used"] <= r["file_bytes"] == out.stat().st_size
    assert r["xattrs"] is True and r["exports"] is False and r["fragments"] is True
    assert r["manifest"]["matches"] is True and r["manifest"]["tool"] == "mksquashfs"
    assert run_cli("inspect", str(out)) == 0
    text = capsys.readouterr().out
    assert "compression:  gzip, 256.0 KiB blocks" in text and "manifest:     matches the image" in text


def test_bad_images_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.sqfs"
    junk.write_bytes(os.urandom(8192))
    assert run_cli("inspect", str(junk)) == 4
    assert run_cli("verify", str(junk)) == 4
    assert run_cli("inspect", str(tmp_path / "missing.sqfs")) == 3
    assert run_cli("verify", str(tmp_path / "missing.sqfs")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(ln.startswith("scratchfs: error: ") for ln in err)


@pytest.mark.slow
def test_sparse_multi_gib_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 5 GiB sparse file (over the 4 GiB limit of basic file inodes) with data at both ends
    and in the middle, next to small files."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "sparse.bin"
    size = 5 << 30
    marks = {0: b"head" * 1000, (5 << 30) // 2 + 12345: os.urandom(300_000), size - 5000: b"tail" * 1250}
    with open(big, "wb") as f:
        f.truncate(size)
        for off, data in marks.items():
            f.seek(off)
            f.write(data)
    assert big.stat().st_blocks * 512 < 16 << 20
    (src / "small.txt").write_text("small\n")
    out = tmp_path / "s.sqfs"
    assert run_cli("build", str(src), str(out)) == 0
    m = read_manifest(out)
    assert m is not None and m.options["sparse"] is True and m.options["block_size"] == 1 << 20
    assert out.stat().st_size < 8 << 20
    capsys.readouterr()
    assert run_cli("verify", "--against", str(src), str(out)) == 0
    with Image.open(out) as img:
        ino = img.resolve("sparse.bin")
        assert ino.size == size
        for off, data in marks.items():
            assert img.read(ino, off, len(data)) == data
    # a change deep inside the hole is found and named
    with open(big, "r+b") as f:
        f.seek(3 << 30)
        f.write(b"!")
    assert run_cli("verify", "--against", str(src), str(out)) == 1
    assert f"content differs: sparse.bin (first difference at byte {3 << 30})" in problems_of(capsys)
    assert stat.S_ISREG(big.stat().st_mode)
