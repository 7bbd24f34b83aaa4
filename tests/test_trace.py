"""The trace format's logical sizes: parsing, writing, mountd's recorder and what the daemon
records, with real files (and, for the daemon, real images built by ``scratchfs image build``)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import trio

from mountd.daemon import Daemon, Settings
from mountd.recorder import TraceRecorder
from scratchfs import cli
from scratchfs.errors import UsageError
from scratchfs.image.manifest import read_manifest
from scratchfs.trace import Event, Trace, TraceWriter, parse_lines, read_trace, write_trace


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_roundtrip_with_logical_sizes(tmp_path: Path, name: str) -> None:
    tr = Trace({"a": 100, "b.v2": 50, "c": 7}, [Event(0.0, "a", 30), Event(1.5, "b.v2", 400)],
               meta={"host": "n1"}, logical_sizes={"a": 400, "b.v2": 1000})  # fmt: skip
    write_trace(tmp_path / name, tr)
    back = read_trace(tmp_path / name)
    assert back == tr
    assert "logical_sizes" not in back.meta  # a field of its own, not header clutter


def test_old_traces_without_logical_sizes_still_read(tmp_path: Path) -> None:
    p = tmp_path / "old.jsonl"
    p.write_text('{"scratchfs_trace": 1, "sizes": {"a": 5}}\n{"sizes": {"b": 9}}\n{"t": 1, "dataset": "b", "bytes": 3}\n')
    tr = read_trace(p)
    assert tr.sizes == {"a": 5, "b": 9} and tr.logical_sizes == {} and tr.total_bytes == 3
    write_trace(tmp_path / "again.jsonl", tr)  # and written back without the key
    assert "logical_sizes" not in lines_of(tmp_path / "again.jsonl")[0]


def test_update_lines_carry_logical_sizes() -> None:
    text = [
        '{"scratchfs_trace": 1, "sizes": {"a": 5}, "logical_sizes": {"a": 20}}\n',
        '{"t": 1, "dataset": "a", "bytes": 3}\n',
        '{"sizes": {"late": 10}, "logical_sizes": {"late": 30}}\n',  # appears with its logical size
        '{"logical_sizes": {"a": 25}}\n',  # a logical size alone: the newest one counts
        '{"t": 2, "dataset": "late", "bytes": 4}\n',
    ]
    tr = parse_lines(text)
    assert tr.sizes == {"a": 5, "late": 10}
    assert tr.logical_sizes == {"a": 25, "late": 30}
    assert [e.dataset for e in tr.events] == ["a", "late"]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"scratchfs_trace": 1, "sizes": {"a": 5}, "logical_sizes": {"a": 0}}'], r":1: logical size of 'a' must be a positive"),
        (['{"scratchfs_trace": 1, "sizes": {"a": 5}, "logical_sizes": {"a": 1.5}}'], r":1: logical size of 'a'"),
        (['{"scratchfs_trace": 1, "sizes": {"a": 5}, "logical_sizes": {"a": true}}'], r":1: logical size of 'a'"),
        (['{"scratchfs_trace": 1, "sizes": {"a": 5}, "logical_sizes": [1]}'], r":1: 'logical_sizes' must be an object"),
        (['{"scratchfs_trace": 1, "sizes": {}, "logical_sizes": {"x": 9}}'], r":1: logical size of 'x', which has no size"),
        (['{"scratchfs_trace": 1, "sizes": {}}', '{"logical_sizes": {"x": 9}}'], r":2: logical size of 'x', which has no size"),
        (['{"scratchfs_trace": 1, "sizes": {}}', '{"logical_sizes": {"a/b": 9}}'], r":2: bad dataset name"),
    ],
)
def test_bad_logical_sizes_name_the_line(lines: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match) as e:
        parse_lines([line + "\n" for line in lines], where="t")
    assert "\n" not in str(e.value)


def test_interval_reads_back_and_bad_ones_name_the_line(tmp_path: Path) -> None:
    tr = Trace({"a": 5}, [Event(1.0, "a", 3)], interval=0.25)
    write_trace(tmp_path / "t.jsonl", tr)
    assert lines_of(tmp_path / "t.jsonl")[0]["interval"] == 0.25
    back = read_trace(tmp_path / "t.jsonl")
    assert back == tr and "interval" not in back.meta
    assert parse_lines(['{"scratchfs_trace": 1, "sizes": {}}\n']).interval is None  # per-read traces have none
    for bad in ("0", "-1", "true", '"1s"'):
        with pytest.raises(UsageError, match=r"^t:1: 'interval' must be a positive number of seconds$"):
            parse_lines([f'{{"scratchfs_trace": 1, "sizes": {{}}, "interval": {bad}}}\n'], where="t")


def test_writer_writes_only_what_changed_and_drops_unknown_logical_sizes() -> None:
    out = io.StringIO()
    w = TraceWriter(out, {"a": 5, "b": 6}, {"a": 20, "b": 0, "ghost": 3}, host="n1")
    w.sizes({"a": 5, "b": 6}, {"a": 20})  # nothing new: no line
    w.event(1.0, "a", 2)
    w.sizes({"a": 5, "b": 6, "c": 8}, {"a": 20, "c": 40, "nosize": 7})
    w.sizes({"a": 5, "b": 6, "c": 8}, {"a": 21, "c": 40})
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert recs[0] == {"scratchfs_trace": 1, "host": "n1", "sizes": {"a": 5, "b": 6}, "logical_sizes": {"a": 20}}
    assert recs[1:] == [
        {"t": 1.0, "dataset": "a", "bytes": 2},
        {"sizes": {"c": 8}, "logical_sizes": {"c": 40}},
        {"logical_sizes": {"a": 21}},
    ]
    tr = parse_lines(out.getvalue().splitlines(keepends=True))
    assert tr.logical_sizes == {"a": 21, "c": 40} and tr.sizes == {"a": 5, "b": 6, "c": 8}


def test_recorder_writes_logical_sizes_to_a_real_file(tmp_path: Path) -> None:
    """mountd's recorder: header and later datasets carry their logical sizes; the trace reads back."""
    path = tmp_path / "reads.trace"
    rec = TraceRecorder(str(path), 100.0, {"a": 1000}, {"a": 4000}, interval=0.5)
    rec.count("a", 300)
    rec.count("a", 200)
    assert rec.flush(101.0, {"a": 1000}, {"a": 4000})
    rec.count("b", 70)  # a dataset that appeared meanwhile, its logical size known
    rec.count("c", 9)  # and one without a manifest
    assert rec.flush(102.5, {"a": 1000, "b": 50, "c": 60}, {"a": 4000, "b": 150})
    rec.close(103.0, {"a": 1000, "b": 50, "c": 60}, {"a": 4000, "b": 150})
    tr = read_trace(path)
    assert tr.sizes == {"a": 1000, "b": 50, "c": 60}
    assert tr.logical_sizes == {"a": 4000, "b": 150}
    assert tr.events == [Event(1.0, "a", 500), Event(2.5, "b", 70), Event(2.5, "c", 9)]
    assert tr.meta["recorder"] == "scratchfs-mountd"
    assert tr.interval == 0.5  # each event aggregates one sampling interval of reads
    assert lines_of(path)[1] == {"t": 1.0, "dataset": "a", "bytes": 500}  # header already had a's logical size


def test_daemon_records_the_logical_sizes_from_the_manifests(tmp_path: Path) -> None:
    """The daemon's own scan (real images, no mount): an image built by ``scratchfs image build``
    has a manifest and its logical size is recorded, in the header and for an image that appears
    later; an image made by plain mksquashfs has none and is recorded without."""
    data, src = tmp_path / "data", tmp_path / "src"
    data.mkdir()
    src.mkdir()
    (src / "text.txt").write_bytes(b"the same line again\n" * 20_000)  # compresses well
    (src / "more.txt").write_bytes(b"another line\n" * 5_000)
    assert cli.main(["image", "build", str(src), str(data / "built.sqfs")]) == 0
    subprocess.run(["mksquashfs", str(src), str(data / "plain.sqfs"), "-noappend", "-quiet", "-no-progress"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    logical = read_manifest(data / "built.sqfs").logical_bytes  # type: ignore[union-attr]
    assert logical == 20 * 20_000 + 13 * 5_000
    trace = tmp_path / "reads.trace"
    daemon = Daemon(Settings(datadirs=(data,), cachedir=tmp_path / "cache", mountdir=tmp_path / "mnt"))

    async def record() -> None:
        await daemon._scan_once()
        daemon._start_trace(str(trace), 0.0)
        assert cli.main(["image", "build", str(src), str(data / "late.v2.sqfs")]) == 0
        await daemon._scan_once()
        daemon._flush_trace(1.0)
        assert daemon._trace is not None
        daemon._trace.close(2.0, daemon._sizes(), daemon._logical_sizes())

    try:
        trio.run(record)
    finally:
        for m in daemon.managed.values():
            m.ds.image.close()
    tr = read_trace(trace)
    assert tr.sizes == {n: (data / f"{n}.sqfs").stat().st_size for n in ("built", "plain", "late.v2")}
    assert tr.logical_sizes == {"built": logical, "late.v2": logical}
    assert lines_of(trace)[0]["logical_sizes"] == {"built": logical}  # known from the start
