"""The command line: help for every command, and errors as one line with a documented exit status."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fedsync.base.errors import EXIT_CODES
from fedsync.cli.main import app
from fedsync.run.config import load_config
from fedsync.run.start import open_run
from fedsync.storage.markers import CoordinatorLease, Summary, WorkerInfo
from fedsync.storage.medium import POLL_INTERVAL_S, POLLED_FILESYSTEMS, choose_mode, describe_modes
from fedsync.storage.share import Share
from fedsync.storage.watch import ShareWatcher

from .helpers import ENV, FEDSYNC, coordinator_identity, finish, run, start

COMMANDS = ["coordinator", "worker", "infer", "trust", "status", "verify", "results", "eval", "export", "demo",
            "doctor"]
NO_SHARE = {"doctor"}  # looks at this machine only


@pytest.mark.processes
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0
    assert "Example" in out.stdout, out.stdout
    assert ("--share" in out.stdout) != (command in NO_SHARE), out.stdout
    assert len(out.stdout) > 300


@pytest.mark.processes
def test_every_command_is_listed() -> None:
    out = run("--help").stdout
    assert all(command in out for command in COMMANDS)
    assert sorted(c.name or c.callback.__name__ for c in app.registered_commands) == sorted(COMMANDS)


@pytest.mark.processes
def test_top_level_help_lists_exit_statuses() -> None:
    out = run("--help").stdout
    for code in EXIT_CODES:
        assert f"{code}:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_options_show_what_they_take_and_flags_show_nothing(command: str) -> None:
    """Every option that takes a value names it as people write it (DIR, N, KEY=VALUE), never a Python type; a flag
    (--json, --help) shows no value at all, as if it took one."""
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"}).output
    options = [line for line in out.splitlines() if re.match(r"│ (\*)?\s*--", line)]  # "*": a required option
    assert options and not [o for o in options if re.search(r"<(bool|str|int|float|path|list\[str\])>", o)], out
    for flag in ("--json", "--help"):
        for line in out.splitlines():
            if re.search(rf"{flag}\b", line) and "│ " + flag in line:
                assert re.match(rf"│ {flag}\s+[A-Z][a-z]", line), line


def test_set_rounds_and_share_read_like_their_use() -> None:
    help_text = _help("coordinator")
    assert "--set KEY=VALUE" in help_text and "--share DIR" in help_text and "--config NAME|FILE" in help_text
    assert "The run's total number of rounds, not rounds to add" in help_text


@pytest.mark.processes
def test_the_command_list_has_one_line_per_command_and_the_version_is_there() -> None:
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"}).output
    listed = [line for line in out.splitlines() if re.match(r"│ (" + "|".join(COMMANDS) + r")\s", line)]
    assert len(listed) == len(COMMANDS) and all(line.rstrip(" │").endswith(".") for line in listed), listed
    broken = [line for line in out.split("Options")[0].splitlines() if re.match(r" {2,}\S", line)]
    assert not broken, broken  # the exit statuses' texts are not broken mid-sentence (an indented remainder)
    version = run("--version")
    assert version.returncode == 0 and re.fullmatch(r"fedsync \d+\.\d+\.\d+ \(share format \d+\)\n", version.stdout)


@pytest.mark.processes
@pytest.mark.parametrize("command", ["status", "verify"])
def test_a_missing_share_or_one_without_a_run_is_said_plainly(command: str, tmp_path: Path) -> None:
    gone = run(command, "--share", str(tmp_path / "gone"))
    assert gone.returncode == 5 and "does not exist: mount or sync it first" in gone.stderr, gone.stderr
    empty = run(command, "--share", str(tmp_path))
    assert empty.returncode == 5 and "holds no fedsync run" in empty.stderr and "Errno" not in empty.stderr


def _help(command: str) -> str:
    """`fedsync COMMAND --help` as one line of words, the table's borders and line breaks taken out."""
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "100"}).output
    return " ".join(out.replace("│", " ").split())


@pytest.mark.parametrize("command", ["coordinator", "worker"])
def test_watch_help_says_what_watching_does(command: str, tmp_path: Path) -> None:
    """--watch's help is the text the watcher's own module writes, and each claim in it holds."""
    text = describe_modes()
    assert text in _help(command)
    for fstype in [*POLLED_FILESYSTEMS, "fuse.sshfs", "fuse.rclone"]:
        assert fstype.removeprefix("fuse.") in text
        mountinfo = f"36 1 0:40 / /mnt/share rw - {fstype} server:/x rw\n"
        assert choose_mode("auto", Path("/mnt/share/run"), mountinfo)[0] == "poll", fstype
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "fuseblk"):
        assert choose_mode("auto", Path("/mnt/share"), f"36 1 0:40 / /mnt/share rw - {fstype} x rw\n")[0] == "events"
    with ShareWatcher(Share(tmp_path), "poll") as w:
        assert f"every {POLL_INTERVAL_S:g} s" in text and w.describe.startswith(f"polling every {POLL_INTERVAL_S:g} s")


@pytest.mark.parametrize("command", ["coordinator", "worker"])
def test_data_root_help_names_the_fallback(command: str) -> None:
    assert "--data-root" in _help(command) and "Default: the run config's data_root" in _help(command)


@pytest.mark.processes
def test_errors_are_one_line_with_their_status(tmp_path: Path) -> None:
    cifar = tmp_path / "cifar-share"
    (tmp_path / "c").mkdir()  # a share that is there, for a run whose data is not
    # a run whose data this machine lacks
    open_run(Share(cifar), load_config("cifar10"), "coordinator", coordinator_identity())
    cases = [
        (["coordinator", "--share", str(tmp_path / "c"), "--config", "cifar10", "--data-root",
          str(tmp_path / "mine")], 6, f"{tmp_path / 'mine'}/cifar-10-batches-py lacks"),
        (["worker", "--share", str(cifar), "--data-root", str(tmp_path / "mine")], 6,
         f"{tmp_path / 'mine'}/cifar-10-batches-py lacks"),
        (["worker", "--share", str(tmp_path / "nope")], 5, "does not exist"),
        (["coordinator", "--share", str(tmp_path / "s"), "--set", "quorum=0"], 3, "quorum"),
        (["coordinator", "--share", str(tmp_path / "s"), "--set", "colour=blue"], 3, "unknown key"),
        (["coordinator", "--share", str(tmp_path / "s"), "--config", "nope.yaml"], 3, "neither a built-in"),
        (["worker", "--share", str(tmp_path), "--device", "cuda"], 7, "no CUDA GPU"),
        (["worker", "--share", str(tmp_path), "--name", "../evil"], 2, "not allowed"),
        (["status", "--share", str(tmp_path)], 5, "fedsync.yaml"),
        (["coordinator", "--share", str(tmp_path / "s"), "--watch", "sometimes"], 2, "sometimes"),
        (["coordinator", "--share", "https://host/run"], 5, "share https://host/run: fedsync reads shares from s3://"),
    ]
    with ThreadPoolExecutor(3) as pool:  # each case is a process that starts, fails and exits
        outs = list(pool.map(lambda case: run(*case[0]), cases))
    for (args, status, words), out in zip(cases, outs):
        assert out.returncode == status, (args, out.stdout, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not Path("https:").exists()  # the URL was not taken for a folder name in the current directory


@pytest.mark.processes
def test_the_demo_runs_its_processes_and_reaches_real_accuracy(share: Path) -> None:
    """`fedsync demo`, as the README's first command runs it (fewer rounds): a coordinator and workers, each a
    process of its own (on Linux forked after torch was imported once), over a local share."""
    demo = start("demo", "--share", str(share), "--rounds", "4", "--workers", "2")
    out = finish(demo, timeout=120)
    assert demo.returncode == 0, out
    m = re.search(r"demo finished: 4 rounds, 2 workers, final test accuracy ([\d.]+)", out)
    assert m and float(m.group(1)) >= 0.9, out
    s = Share(share)
    lease = s.read_record(CoordinatorLease, s.lease)
    assert lease.state == "finished" and lease.pid != demo.pid  # the coordinator ran in a process of its own
    workers = {p.stem: s.read_record(WorkerInfo, f"workers/{p.name}") for p in (share / "workers").glob("*.yaml")}
    assert sorted(workers) == ["demo-worker-1", "demo-worker-2"] and all(w.state == "stopped" for w in workers.values())
    for r in range(1, 5):
        assert len(s.read_record(Summary, s.summary(r)).accepted) == 2
    # the report a person browsing the share sees is current: the last round, its accuracy, its curve
    report = (share / "report.md").read_text()
    assert "## Round 4, the latest" in report and f"| 4 | {float(m.group(1)):.4f} |" in report, report
    assert "![test accuracy, losses and training time per round](report.png)" in report
    _check_plot(share / "report.png")
    # results prints the same table and draws the same curves where it is asked to
    shown = run("results", "--share", str(share), "--plot", str(share.parent / "curves.png"))
    assert shown.returncode == 0 and len(re.findall(r"^\s+[1-4]\s+0\.\d{4}", shown.stdout, re.M)) == 4, shown.stdout
    assert re.search(r"training time by device kind: CPU \d+\.\d s; tensors moved through the share: \d", shown.stdout)
    _check_plot(share.parent / "curves.png")
    # the live view, under a pseudo-terminal as a person runs it, ends cleanly on Ctrl-C
    screen, code = _watched(share)
    assert code == 0 and "finished after round 4" in screen and "demo-worker-2" in screen, screen
    assert "\x1b[" in screen and "samples/s" in screen and "heartbeat" in screen  # drawn, with its columns


def _watched(share: Path) -> tuple[str, int]:
    """`fedsync status --watch` on a pseudo-terminal until it has drawn the workers twice (a redraw), then Ctrl-C."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([*FEDSYNC, "status", "--watch", "--share", str(share)], stdin=secondary,
                            stdout=secondary, stderr=secondary, env={**ENV, "COLUMNS": "120", "TERM": "xterm"})
    os.close(secondary)
    screen, end = b"", time.monotonic() + 30
    while screen.count(b"demo-worker-2") < 2 and time.monotonic() < end and proc.poll() is None:
        if select.select([primary], [], [], 0.2)[0]:
            screen += os.read(primary, 1 << 16)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=15)
    os.close(primary)
    return screen.decode(errors="replace"), code


def _check_plot(path: Path) -> None:
    """A PNG of the three panels with real curves in it: the accuracy line's blue and the training loss's orange
    (matplotlib's first two colours), not a blank canvas."""
    with Image.open(path) as image:
        assert image.size == (1200, 360)
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20) or []}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours and len(colours) > 50
