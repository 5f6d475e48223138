"""The command line: help for every command, and errors as one line with a documented exit status."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsync.base.errors import EXIT_CODES

from .conftest import run

COMMANDS = ["coordinator", "worker", "status", "verify", "demo", "doctor"]
NO_SHARE = {"doctor"}  # looks at this machine only


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0
    assert "Example" in out.stdout, out.stdout
    assert ("--share" in out.stdout) != (command in NO_SHARE), out.stdout
    assert len(out.stdout) > 300


def test_every_command_is_listed() -> None:
    out = run("--help").stdout
    assert all(command in out for command in COMMANDS)
    from fedsync.cli.main import app
    assert sorted(c.name or c.callback.__name__ for c in app.registered_commands) == sorted(COMMANDS)


def test_top_level_help_lists_exit_statuses() -> None:
    out = run("--help").stdout
    for code in EXIT_CODES:
        assert f"{code}:" in out


def test_errors_are_one_line_with_their_status(tmp_path: Path) -> None:
    cases = [
        (["worker", "--share", str(tmp_path / "nope")], 5, "does not exist"),
        (["coordinator", "--share", str(tmp_path / "s"), "--set", "quorum=0"], 3, "quorum"),
        (["coordinator", "--share", str(tmp_path / "s"), "--set", "colour=blue"], 3, "unknown key"),
        (["coordinator", "--share", str(tmp_path / "s"), "--config", "nope.yaml"], 3, "neither a built-in"),
        (["worker", "--share", str(tmp_path), "--device", "cuda"], 7, "no CUDA GPU"),
        (["worker", "--share", str(tmp_path), "--name", "../evil"], 2, "not allowed"),
        (["status", "--share", str(tmp_path)], 5, "fedsync.yaml"),
        (["coordinator", "--share", str(tmp_path / "s"), "--watch", "sometimes"], 2, "sometimes"),
    ]
    with ThreadPoolExecutor(3) as pool:  # each case is a process that starts, fails and exits
        outs = list(pool.map(lambda case: run(*case[0]), cases))
    for (args, status, words), out in zip(cases, outs):
        assert out.returncode == status, (args, out.stdout, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
