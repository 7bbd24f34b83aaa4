"""mountd.toml parsing and validation, with real files."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import re
from pathlib import Path

import pytest
import trio

from mountd import main as mountd_main
from mountd.config import (
    KEYS,
    MountdConfig,
    add_override_arguments,
    apply_overrides,
    load_config,
    overrides_from_args,
)
from mountd.daemon import Daemon
from scratchfs.errors import NotFoundError, UsageError

REPO = Path(__file__).resolve().parent.parent
BASE = 'datadir = "/scratch/ds"\ncachedir = "/ssd/cache"\nmountdir = "/datasets"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mountd.toml"
    p.write_text(text)
    return p


def test_sample_config_in_packaging_is_valid() -> None:
    cfg = load_config(REPO / "packaging" / "mountd.toml")
    assert cfg.datadirs and cfg.cachedir.is_absolute()


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.datadirs == (Path("/scratch/ds"),)
    assert cfg.capacity_bytes(1000) == 800  # 80 % default
    assert cfg.reserve_bytes(1000) == 50
    assert cfg.window == 600 and cfg.min_residency == 0
    assert cfg.copy_bandwidth == 0 and cfg.allow_other is True and cfg.control_gid is None


def test_full_config(tmp_path: Path) -> None:
    gname = grp.getgrgid(os.getgid()).gr_name
    cfg = load_config(
        write(
            tmp_path,
            'datadir = ["/scratch/a", "/project/b"]\ncachedir = "/ssd/cache"\nmountdir = "/datasets"\n'
            'capacity = "1.5T"\nreserve = "10G"\nwindow = "5m"\nmin_residency = 90\ncopy_bandwidth = "200M"\n'
            f'pinned = ["imagenet.v1"]\nnever_cache = ["huge"]\nallow_other = false\ncontrol_group = "{gname}"\n',
        )
    )
    assert cfg.datadirs == (Path("/scratch/a"), Path("/project/b"))
    assert cfg.capacity_bytes(0) == int(1.5 * (1 << 40))
    assert cfg.reserve_bytes(0) == 10 << 30
    assert cfg.window == 300 and cfg.min_residency == 90
    assert cfg.copy_bandwidth == 200 << 20
    assert cfg.pinned == {"imagenet.v1"} and cfg.never_cache == {"huge"}
    assert cfg.allow_other is False
    assert cfg.control_gid == os.getgid()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('capacity = "lots"', "capacity"),
        ('capacity = "0"', "capacity"),
        ('capacity = "150%"', "capacity"),
        ("capacity = true", "capacity"),
        ('reserve = "-1G"', "reserve"),
        ('window = "0s"', "window"),
        ('window = "soon"', "window"),
        ("min_residency = -5", "min_residency"),
        ('copy_bandwidth = "fast"', "copy_bandwidth"),
        ('pinned = "a"', "pinned"),
        ('never_cache = ["a/b"]', "never_cache"),
        ('allow_other = "yes"', "allow_other"),
        ('control_group = "no-such-group-xyz"', "control_group"),
        ("windw = 5", "windw"),
        ('control_socket = "relative.sock"', "control_socket"),
        ('control_socket = "/datasets/ctl.sock"', "control_socket"),
        ("metrics_file = 5", "metrics_file"),
        ('metrics_file = "/datasets/x/m.prom"', "metrics_file"),
        ('block_cache = "lots"', "block_cache"),
        ("block_cache = -1", "block_cache"),
        ("threads = 0", "threads"),
        ('threads = "4"', "threads"),
        ("threads = 2.5", "threads"),
        ("threads = true", "threads"),
        ('scan_interval = "0s"', "scan_interval"),
        ("scan_interval = 0.01", "scan_interval"),
        ('policy_interval = "often"', "policy_interval"),
        ("policy_interval = -2", "policy_interval"),
        ('control_sockt = "/x"', "control_sockt"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, BASE + line + "\n"))
    msg = str(e.value)
    assert f"{key}" in msg and "\n" not in msg


def test_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown key 'windw' .*did you mean 'window'"):
        load_config(write(tmp_path, BASE + "windw = 5\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('cachedir = "/c"\nmountdir = "/m"\n', "datadir"),
        ('datadir = "relative/dir"\ncachedir = "/c"\nmountdir = "/m"\n', "datadir"),
        ('datadir = "/d"\ncachedir = "/d/cache"\nmountdir = "/m"\n', "cachedir"),
        ('datadir = "/d"\ncachedir = "/c"\nmountdir = "/c"\n', "mountdir"),
        (BASE + 'pinned = ["x"]\nnever_cache = ["x"]\n', "pinned"),
        (BASE + 'capacity = "98%"\nreserve = "5%"\n', "capacity"),
    ],
)
def test_cross_key_errors(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(UsageError, match=key):
        load_config(write(tmp_path, text))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(write(tmp_path, "datadir = [unclosed\n"))
    with pytest.raises(NotFoundError):
        load_config(tmp_path / "absent.toml")


def test_cli_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + 'capacity = "100G"\n'))
    parser = argparse.ArgumentParser()
    add_override_arguments(parser)
    args = parser.parse_args(
        ["--capacity", "50%", "--pinned", "a, b", "--allow-other", "no", "--datadir", "/x", "--datadir", "/y"]
    )
    new = apply_overrides(cfg, overrides_from_args(args))
    assert new.capacity_bytes(1000) == 500
    assert new.pinned == {"a", "b"}
    assert new.allow_other is False
    assert new.datadirs == (Path("/x"), Path("/y"))
    assert cfg.capacity_bytes(0) == 100 << 30  # the original is untouched
    assert sorted(cfg.restart_needed(new)) == ["allow_other", "datadir"]


def test_cli_override_errors_name_the_flag(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(UsageError, match=r"^--window: "):
        apply_overrides(cfg, {"window": "never"})
    with pytest.raises(UsageError, match=r"--never-cache"):
        apply_overrides(cfg, {"never_cache": "a/b"})
    with pytest.raises(UsageError, match="mountdir"):
        apply_overrides(cfg, {"mountdir": "/scratch/ds/sub"})


def test_relative_cli_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write(tmp_path, BASE))
    monkeypatch.chdir(tmp_path)
    new = apply_overrides(cfg, {"cachedir": "cache"})
    assert new.cachedir == tmp_path / "cache"
    assert isinstance(new, MountdConfig)


# -- daemon plumbing keys: socket, metrics, block cache, threads, intervals ------------------


def test_plumbing_keys_from_the_file_and_their_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.control_socket == Path("/run/scratchfs/mountd.sock")
    assert cfg.metrics_file is None and cfg.threads is None
    assert cfg.block_cache == 64 << 20
    assert cfg.scan_interval == 2.0 and cfg.policy_interval == 2.0
    cfg = load_config(write(tmp_path, BASE + 'control_socket = "/run/x/../ctl.sock"\nmetrics_file = "/var/m.prom"\n'
                                              'block_cache = "256M"\nthreads = 3\nscan_interval = "1m"\n'
                                              "policy_interval = 0.5\n"))  # fmt: skip
    assert cfg.control_socket == Path("/run/ctl.sock")
    assert cfg.metrics_file == Path("/var/m.prom")
    assert cfg.block_cache == 256 << 20 and cfg.threads == 3
    assert cfg.scan_interval == 60.0 and cfg.policy_interval == 0.5
    assert load_config(write(tmp_path, BASE + "block_cache = 0\n")).block_cache == 0  # no decoded-block cache


def test_sample_config_commented_defaults_are_valid_and_are_the_defaults(tmp_path: Path) -> None:
    """Every commented ``# key = value`` of the sample parses; where the sample says it shows the
    default, it is the default."""
    text = (REPO / "packaging" / "mountd.toml").read_text()
    commented = dict(re.findall(r"^# (\w+) = (.+)$", text, re.M))
    assert {"control_socket", "metrics_file", "block_cache", "threads", "scan_interval", "policy_interval"} <= set(commented)
    defaults = load_config(REPO / "packaging" / "mountd.toml")
    for key, value in commented.items():
        if key not in KEYS or key == "control_group":  # the sample's group need not exist here
            continue
        doc = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))
        cfg = load_config(write(tmp_path, doc + f"\n{key} = {value}\n"))
        if key in ("control_socket", "block_cache", "scan_interval", "policy_interval"):
            assert getattr(cfg, key) == getattr(defaults, key) == getattr(MountdConfig, key), key


def settings_for(tmp_path: Path, text: str, *flags: str) -> tuple[argparse.Namespace, mountd_main.Settings]:
    conf = write(tmp_path, text)
    args = mountd_main.build_parser().parse_args(["--config", str(conf), *flags])
    return args, mountd_main.load_settings(args)


def test_flag_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``scratchfs-mountd`` runs with: each key from its flag if given, else the file, else
    the default (scratchfs-mountd's own argument parser and settings loader)."""
    monkeypatch.chdir(tmp_path)
    text = BASE + 'control_socket = "/run/file.sock"\nthreads = 3\nscan_interval = "5s"\nblock_cache = "1M"\n'
    _, s = settings_for(tmp_path, text, "--threads", "5", "--socket", "flag.sock", "--metrics", "m.prom")
    assert s.threads == 5  # flag over file
    assert s.control_socket == tmp_path / "flag.sock"  # flag over file, relative to the cwd
    assert s.metrics_file == tmp_path / "m.prom"  # flag over default
    assert s.scan_interval == 5.0 and s.block_cache == 1 << 20  # file over default
    assert s.policy_interval == 2.0  # default
    _, s = settings_for(tmp_path, text)
    assert s.threads == 3 and s.control_socket == Path("/run/file.sock") and s.metrics_file is None
    _, s = settings_for(tmp_path, BASE, "--policy-interval", "0.25", "--block-cache", "0")
    assert s.policy_interval == 0.25 and s.block_cache == 0 and s.threads is None


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--threads", "many"], r"^--threads: "),
        (["--threads", "0"], r"^--threads: "),
        (["--scan-interval", "0.01"], r"^--scan-interval: must be at least"),
        (["--policy-interval", "soon"], r"^--policy-interval: "),
        (["--block-cache", "big"], r"^--block-cache: "),
        (["--metrics", "/datasets/m.prom"], r"^--metrics: .*inside mountdir"),
    ],
)
def test_plumbing_flag_errors_name_the_flag(tmp_path: Path, flags: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match) as e:
        settings_for(tmp_path, BASE, *flags)
    assert "\n" not in str(e.value)


def test_reload_applies_what_it_can_and_keeps_restart_only_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP's reload, in-process (no mount): the file is read again with the same flags on top;
    intervals and the metrics file change; socket, threads and block cache keep their running
    values with a warning that the change needs a restart."""
    cache = tmp_path / "cache"
    base = f'datadir = "{tmp_path / "data"}"\ncachedir = "{cache}"\nmountdir = "{tmp_path / "mnt"}"\n'
    args, first = settings_for(tmp_path, base + 'control_socket = "/run/a.sock"\nthreads = 2\nscan_interval = 3\n',
                               "--policy-interval", "4")  # fmt: skip
    daemon = Daemon(first, reload=lambda: mountd_main.load_settings(args))
    write(tmp_path, base + 'control_socket = "/run/b.sock"\nthreads = 6\nblock_cache = "8M"\nscan_interval = 7\n'
                           f'policy_interval = 9\nmetrics_file = "{tmp_path / "m.prom"}"\npinned = ["x"]\n')  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mountd.daemon"):
        trio.run(daemon.reload)
    s = daemon.s
    assert s.scan_interval == 7.0 and s.metrics_file == tmp_path / "m.prom" and s.pinned == {"x"}  # applied
    assert s.policy_interval == 4.0  # the flag still beats the file after a reload
    assert s.control_socket == Path("/run/a.sock") and s.threads == 2 and s.block_cache == 64 << 20  # kept
    warned = sorted(r.getMessage() for r in caplog.records)
    assert warned == [
        f"reload: block_cache changes need a restart; keeping {64 << 20}",
        "reload: control_socket changes need a restart; keeping /run/a.sock",
        "reload: threads changes need a restart; keeping 2",
    ]
