"""Fixtures, and the `processes` marker kept honest: a test that starts fedsync processes through tests/helpers.py
without the marker fails, so `make test-fast` (-m "not processes") stays fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "processes: starts real processes (fedsync roles, Syncthing, sshd, an S3 "
                                       "server); left out of the fast lane, `make test-fast`")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test is set up (a module's fixture may start processes too)."""
    helpers.PROCESSES_ALLOWED = item.get_closest_marker("processes") is not None


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    return path
