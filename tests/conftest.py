"""Shared fixtures: per-session caches of source trees and squashfs images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests import imagegen


class ImageCache:
    """Builds source trees and images on first use, once per test session."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._trees: dict[tuple[tuple[str, object], ...], Path] = {}
        self._images: dict[str, Path] = {}

    def tree(self, **options: Any) -> Path:
        key = tuple(sorted(options.items()))
        if key not in self._trees:
            path = self.base / ("tree-" + "-".join(f"{k}{int(v)}" for k, v in key))
            imagegen.build_full_tree(path, **options)
            self._trees[key] = path
        return self._trees[key]

    def image(self, spec: imagegen.ImageSpec) -> Path:
        if spec.name not in self._images:
            src = self.tree(**imagegen.tree_options(spec))
            self._images[spec.name] = imagegen.build_image(spec, src, self.base / f"{spec.name}.sqfs")
        return self._images[spec.name]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def need_mounts() -> None:
    """Kernel loop mounts need root; FUSE needs /dev/fuse."""
    if os.geteuid() != 0:
        pytest.skip("kernel squashfs loop mounts need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")


# `make test` sets SCRATCHFS_NO_SKIPS=1: there a skipped test is a test that did not run, and the
# run fails instead of counting it as passed (a plain `pytest` still reports skips as skips).
NO_SKIPS = "SCRATCHFS_NO_SKIPS"


def _failing_skips(config: pytest.Config) -> list[Any]:
    """The skipped tests' reports, when SCRATCHFS_NO_SKIPS=1 makes them fail the run (else none)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get(NO_SKIPS) != "1" or reporter is None:
        return []
    return list(reporter.stats.get("skipped", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.OK and _failing_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if skipped := _failing_skips(config):
        terminalreporter.write_line(f"{len(skipped)} test(s) skipped; with {NO_SKIPS}=1 (make test) that fails the run",
                                    red=True)  # fmt: skip
