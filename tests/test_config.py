"""mountd.toml parsing and validation, with real files."""

from __future__ import annotations

import argparse
import grp
import os
from pathlib import Path

import pytest

from mountd.config import (
    MountdConfig,
    add_override_arguments,
    apply_overrides,
    load_config,
    overrides_from_args,
)
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
    assert cfg.window == 600 and cfg.min_residency == 600
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
