"""Pure keepalive logic: purge-rule arithmetic, planning, record framing, profiles, path checks."""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path

import pytest

from scratchfs.errors import NotFoundError, PermissionRefused, UsageError
from scratchfs.keepalive import checkpoint as ck
from scratchfs.keepalive import paths, profiles
from scratchfs.keepalive.forecast import DAY, Forecast, effective_age, refresh_protects, summarize
from scratchfs.keepalive.plan import pack_units
from scratchfs.keepalive.profiles import BUILTIN, Profile, PurgeRule
from scratchfs.keepalive.registry import DatasetEntry, is_expired, make_entry

NOW = 2_000_000_000.0


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SCRATCH_KEEPALIVE_PROFILE", raising=False)
    return tmp_path


def test_alliance_needs_both_atime_and_ctime_old():
    rule = BUILTIN["alliance"].rule
    old, young = NOW - 70 * DAY, NOW - 5 * DAY
    assert effective_age(rule, old, old, old, NOW) == pytest.approx(70 * DAY)
    # a recent ctime alone keeps the file off the list, and so does a recent atime alone
    assert effective_age(rule, old, young, old, NOW) == pytest.approx(5 * DAY)
    assert effective_age(rule, young, old, old, NOW) == pytest.approx(5 * DAY)


def test_any_rule_takes_the_oldest_and_mtime_rules_are_not_protected_by_refresh():
    rule = PurgeRule(("atime", "mtime"), "any", 30)
    assert effective_age(rule, NOW, NOW, NOW - 40 * DAY, NOW) == pytest.approx(40 * DAY)
    assert not refresh_protects(rule)
    assert refresh_protects(BUILTIN["nersc"].rule) and refresh_protects(BUILTIN["alliance"].rule)
    assert BUILTIN["nersc"].rule.age_days == 56 and BUILTIN["tacc"].rule.age_days == 10


def test_forecast_counts_candidates_and_risk_within_cadence():
    rule = PurgeRule(("atime",), "all", 30)
    fc = Forecast(rule, NOW, cadence_days=14)
    fc.add(NOW - 40 * DAY, NOW, NOW, 100)  # already a candidate
    fc.add(NOW - 20 * DAY, NOW, NOW, 10)  # becomes one in 10 days: at risk within 14
    fc.add(NOW - 1 * DAY, NOW, NOW, 1)  # safe
    assert (fc.files, fc.bytes) == (3, 111)
    assert (fc.candidates_files, fc.candidates_bytes) == (1, 100)
    assert (fc.at_risk_files, fc.at_risk_bytes) == (2, 110)
    assert fc.first_candidate_time() == pytest.approx(NOW - 10 * DAY)


def test_forecast_warnings():
    prof = BUILTIN["tacc"]
    entry = DatasetEntry("d", "/x", "tree", "2099-01-01")
    fc = Forecast(prof.rule, NOW, 14)
    fc.add(NOW - 2 * DAY, NOW - 2 * DAY, NOW, 5)
    out = summarize(entry, prof, fc, scheduled=False, candidate_hits=3)
    text = "\n".join(out.warnings)
    assert "forbids refresh" in text and "no refresh is scheduled" in text and "candidate list" in text
    first = dt.datetime.fromtimestamp(NOW + 8 * DAY).date().isoformat()
    assert out.first_candidates == first
    out = summarize(DatasetEntry("d", "/x", "tree", "2000-01-01"), BUILTIN["br200"], fc, scheduled=True, candidate_hits=0)
    assert any("expired" in w for w in out.warnings) and not any("scheduled" in w for w in out.warnings)


def test_expiry_is_the_day_after_keep_until():
    e = DatasetEntry("d", "/x", "tree", "2026-07-31")
    assert not is_expired(e, dt.date(2026, 7, 31))
    assert is_expired(e, dt.date(2026, 8, 1))


def test_pack_units_bounds_size_and_keeps_order():
    groups = [(b"", [b"."] + [b"f%d" % i for i in range(5)]), (b"a", [b"x%d" % i for i in range(7)]), (b"b", [])]
    units = list(pack_units(iter(groups), 4))
    assert all(sum(len(n) for _, n in u) <= 4 for u in units)
    flat = [(d, n) for u in units for d, names in u for n in names]
    assert flat == [(d, n) for d, names in groups for n in names]
    with pytest.raises(ValueError):
        list(pack_units(iter(groups), 0))


def test_unit_encoding_roundtrip_with_odd_names():
    groups = [(b"", [b".", b"with\nnewline", b"\xff\xfe"]), (b"d/e", [b"x y"])]
    uid, n, back = ck.decode_unit(ck.encode_unit(7, groups))
    assert (uid, n, back) == (7, 4, groups)


def _records(*payloads: bytes) -> bytes:
    return b"".join(ck.frame(p) for p in payloads)


def test_torn_last_record_is_ignored_and_damage_in_the_middle_is_skipped():
    data = _records(b"one", b"two", b"three")
    for cut in range(1, len(ck.frame(b"three"))):
        res = ck.ScanResult()
        got = [p for _, p in ck.read_records(io.BytesIO(data[:-cut]), res)]
        assert got == [b"one", b"two"] and res.torn
    corrupt = bytearray(data)
    corrupt[len(ck.frame(b"one")) + 13] ^= 0xFF  # inside the payload of "two"
    res = ck.ScanResult()
    got = [p for _, p in ck.read_records(io.BytesIO(bytes(corrupt)), res)]
    assert got == [b"one", b"three"] and res.damaged == 1 and not res.torn


def test_journal_reader_and_appender_truncate_a_torn_tail(tmp_path):
    j = ck.Journal(tmp_path / "journal", "plan-1")
    for u in range(3):
        j.append({"u": u, "n": 1, "ok": 1, "e": 0})
    j.close()
    with open(tmp_path / "journal", "ab") as f:
        f.write(ck.frame(b'{"u": 3}')[:-2])  # a crash in the middle of an append
    st = ck.read_journal(tmp_path / "journal")
    assert st.plan_id == "plan-1" and sorted(st.done) == [0, 1, 2] and st.scan.torn
    j = ck.Journal(tmp_path / "journal", "plan-1", truncate_to=st.scan.end)
    j.append({"u": 4, "n": 1, "ok": 1, "e": 0})
    j.close()
    st = ck.read_journal(tmp_path / "journal")
    assert sorted(st.done) == [0, 1, 2, 4] and not st.scan.torn and not st.scan.damaged


def test_plan_file_is_validated(tmp_path):
    p = tmp_path / "plan"
    info = ck.write_plan(p, {"v": ck.VERSION, "id": "x"}, [[(b"", [b"a", b"b"])], [(b"d", [b"c"])]])
    assert (info.units, info.entries) == (2, 3)
    assert ck.read_plan_info(p).unit_sizes == [2, 1]
    assert [u for u, _, _ in ck.iter_plan_units(p, {0})] == [1]
    raw = p.read_bytes()
    p.write_bytes(raw[:-3])
    with pytest.raises(ck.CheckpointError):
        ck.read_plan_info(p)


def test_profiles_roundtrip_through_toml(xdg):
    prof = Profile(name="mine", roots=("/tmp/$USER/x",), rule=PurgeRule(("atime", "ctime"), "any", 45), workers=3)
    profiles.save_profile(prof)
    name, back = profiles.load_profile()
    assert name == "mine" and back.rule == prof.rule and back.roots == prof.roots and back.workers == 3
    assert str(paths.state_dir("mine")).startswith(str(xdg / "state"))
    assert paths.config_file() == xdg / "cfg" / "scratchfs" / "keepalive.toml"
    with pytest.raises(NotFoundError):
        profiles.load_profile("nosuch")
    paths.config_file().write_text("profiles = [")
    with pytest.raises(UsageError):
        profiles.load_profile()


def test_generic_is_forecast_only_and_tacc_refuses():
    assert "forecast-only" in BUILTIN["generic"].refusal()
    msg = BUILTIN["tacc"].refusal()
    assert "TACC" in msg and "squashfs image" in msg and "archive" in msg
    assert BUILTIN["br200"].refusal() == "" and BUILTIN["alliance"].refusal() == ""


def test_add_refuses_traversal_and_symlink_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "ds").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "escape")
    prof = Profile(name="t", roots=(str(root),))
    assert make_entry("ok", str(root / "ds"), "2030-01-01", prof, NOW).path == str(root / "ds")
    with pytest.raises(PermissionRefused, match=r"'\.\.'"):
        make_entry("x", str(root / "ds" / ".." / ".." / "outside"), "2030-01-01", prof, NOW)
    with pytest.raises(PermissionRefused, match="outside the allowed roots"):
        make_entry("x", str(root / "escape"), "2030-01-01", prof, NOW)
    with pytest.raises(PermissionRefused):
        make_entry("x", str(outside), "2030-01-01", prof, NOW)
    with pytest.raises(UsageError):
        make_entry("../x", str(root / "ds"), "2030-01-01", prof, NOW)
    with pytest.raises(UsageError):
        make_entry("x", str(root / "ds"), "31/07/2026", prof, NOW)
    (root / "plain.txt").write_text("not an image")
    with pytest.raises(UsageError, match="neither a directory nor a squashfs image"):
        make_entry("x", str(root / "plain.txt"), "2030-01-01", prof, NOW)
    assert Path(os.path.realpath(root)) in prof.expanded_roots()


def test_checkpoint_removal_deletes_the_plan_before_the_journal(tmp_path, monkeypatch):
    """Killed between the two deletions, a journal without a plan is left (discarded by the next
    run), never a plan without its journal (which would be resumed as if nothing were done)."""
    for name in (ck.PLAN_NAME, ck.JOURNAL_NAME):
        (tmp_path / name).write_bytes(b"x")
    real_unlink = os.unlink

    def unlink_then_die(path, *a, **kw):
        real_unlink(path, *a, **kw)
        raise KeyboardInterrupt  # the process dies right after its first deletion

    monkeypatch.setattr(ck.os, "unlink", unlink_then_die)
    with pytest.raises(KeyboardInterrupt):
        ck.remove_checkpoint(tmp_path)
    assert not (tmp_path / ck.PLAN_NAME).exists() and (tmp_path / ck.JOURNAL_NAME).exists()
