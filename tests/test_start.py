"""A refused or failed start writes nothing: every check that can refuse (the config against the share, the
rounds already closed, the task's data, the lease, the format) runs before the first write, so the share is
byte for byte as it was, for each exit status a start can end with."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsync.run.config import load_config
from fedsync.run.start import open_run, task_record
from fedsync.storage.manifest import new_manifest
from fedsync.storage.markers import FORMAT_VERSION, Manifest, parse, to_dict
from fedsync.storage.sealing import SealingIdentity
from fedsync.storage.share import Share
from fedsync.storage.yamlfile import dump_yaml

from .helpers import coordinator_identity, finish, read_yaml, run, start, wait_until
from .test_lease import foreign_lease_refreshed

Tree = dict[str, tuple[bytes | None, int, int, int]]


def _all_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (state T in /proc/PID/task/*/stat)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, IndexError):
            continue  # a thread that ended meanwhile
    return bool(states) and all(state in ("T", "t") for state in states)


def tree(root: Path) -> Tree | None:
    """Every entry under root: its bytes (None for a folder), inode, mtime and mode; None if root is absent."""
    if not root.exists():
        return None
    out: Tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = None if path.is_dir() else path.read_bytes()
        out[path.relative_to(root).as_posix()] = (data, st.st_ino, st.st_mtime_ns, st.st_mode)
    return out


def a_run(share: Path, config: str = "digits", **overrides: object) -> Share:
    s = Share(share)
    open_run(s, load_config(config, overrides), "coordinator", coordinator_identity())
    return s


def closed_rounds(share: Path) -> None:
    s = a_run(share)
    for r in (1, 2):
        s.path(s.round_dir(r)).mkdir()
        s.path(s.summary(r)).write_text("round: closed\n")  # only its presence counts for --rounds


NO_DATA = ("--config", "cifar10", "--set", "data_root=/nonexistent/data")


def cifar_run(share: Path) -> None:
    a_run(share, "cifar10", data_root="/nonexistent/data")


def newer_format(share: Path) -> None:
    (share / "fedsync.yaml").write_text(f"format: {FORMAT_VERSION + 1}\nrun_id: x\ncreated: x\n"
                                        "created_by: coordinator\nconfig: {}\n")


def unknown_key(share: Path) -> None:
    cfg = load_config("digits")
    manifest = to_dict(new_manifest(cfg.as_dict(), "coordinator", coordinator_identity(), task_record(cfg)))
    manifest["config"]["colour"] = "blue"
    (share / "fedsync.yaml").write_bytes(dump_yaml(manifest))


def sealing_key_left_behind(share: Path) -> None:
    """The run's signing key copied to another folder without the age key beside it (moved only half)."""
    a_run(share)
    moved = share.parent / "moved" / "coordinator.pem"
    moved.parent.mkdir()
    moved.write_bytes(coordinator_identity().path.read_bytes())
    moved.chmod(0o600)


def recipient_swapped(share: Path) -> None:
    """Someone who can write the share put their own key in fedsync.yaml, to read the updates sealed after."""
    a_run(share)
    text = (share / "fedsync.yaml").read_text()
    recipient = Share(share).read_record(Manifest, Share.manifest).recipient
    (share / "fedsync.yaml").write_text(text.replace(recipient, SealingIdentity.generate().recipient))


def rounds_without_manifest(share: Path) -> None:
    (share / "0001").mkdir()
    (share / "0001" / "assignment.yaml").write_text("format: 1\n")


def coordinator(share: Path, *more: str) -> list[str]:
    return ["coordinator", "--share", str(share), *more]


def worker(share: Path) -> list[str]:
    return ["worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "5"]


CASES: dict[str, tuple[Callable[[Path], object], Callable[[Path], list[str]], int, str]] = {
    "another config": (a_run, lambda p: coordinator(p, "--set", "seed=7"), 3, "another config"),
    "fewer rounds than closed": (closed_rounds, lambda p: coordinator(p, "--rounds", "1"), 3, "at least 2"),
    "no rounds": (a_run, lambda p: coordinator(p, "--rounds", "0"), 3, "at least 1"),
    "bad usage": (a_run, lambda p: coordinator(p, "--watch", "sometimes"), 2, "sometimes"),
    "newer format, coordinator": (newer_format, coordinator, 4, "newer fedsync"),
    "newer format, worker": (newer_format, worker, 4, "newer fedsync"),
    "rounds but no fedsync.yaml": (rounds_without_manifest, coordinator, 5, "no fedsync.yaml"),
    "cifar10 without data, new share": (lambda p: None, lambda p: coordinator(p, *NO_DATA), 6, "CIFAR-10 not found"),
    "no share folder (a typo, a mount not there yet)": (lambda p: p.rmdir(), lambda p: coordinator(p, *NO_DATA), 5,
                                                        "does not exist: mount or sync it first"),
    "cifar10 without data, continuing": (cifar_run, lambda p: coordinator(p, *NO_DATA), 6, "CIFAR-10 not found"),
    "cifar10 without data, worker": (cifar_run, worker, 6, "CIFAR-10 not found"),
    "unknown config key, worker": (unknown_key, worker, 3, "colour"),
    "sealed run, its age key left behind": (sealing_key_left_behind, lambda p: coordinator(
        p, "--key", str(p.parent / "moved" / "coordinator.pem")), 10, "copy the key that opens them here"),
    "sealed run, recipient swapped, worker": (recipient_swapped, worker, 10, "did not sign"),
}


@pytest.mark.processes
def test_a_refused_start_leaves_the_share_as_it_was(tmp_path: Path) -> None:
    """Each case in its own share, three at a time (each is a process that starts, checks and exits)."""
    def attempt(i: int, case: str) -> str | None:
        prepare, command, status, words = CASES[case]
        share = tmp_path / f"case{i}" / "share"
        share.mkdir(parents=True)
        prepare(share)
        before = tree(share)
        out = run(*command(share))
        if out.returncode != status or words not in out.stderr or "Traceback" in out.stderr:
            return f"{case}: exit {out.returncode} (expected {status}, saying {words!r}): {out.stderr}"
        after = tree(share)
        if after != before:
            a, b = after or {}, before or {}
            return f"{case}: the share changed: {sorted(k for k in {*a, *b} if a.get(k) != b.get(k))} " \
                   f"(it {'exists' if after is not None else 'is gone'})"
        return None

    with ThreadPoolExecutor(3) as pool:
        problems = [p for p in pool.map(attempt, range(len(CASES)), CASES) if p]
    assert not problems, "\n".join(problems)


@pytest.mark.processes
def test_after_a_start_without_data_the_corrected_command_starts_the_run(share: Path) -> None:
    refused = run(*coordinator(share, *NO_DATA))
    assert refused.returncode == 6, refused.stderr
    coord = start(*coordinator(share, "--rounds", "1", "--set", "min_workers=9"))
    try:
        wait_until(lambda: (share / "coordinator.yaml").exists(), 60, "the corrected run to start")
        assert parse(Manifest, read_yaml(share / "fedsync.yaml"), "manifest").config["task"] == "digits"
    finally:
        coord.terminate()
        finish(coord, timeout=30)


@pytest.mark.processes
def test_refused_by_a_coordinator_on_this_host(share: Path) -> None:
    first = start(*coordinator(share, "--set", "min_workers=5"))
    try:
        wait_until(lambda: (share / "coordinator.yaml").exists(), 60, "the first coordinator's lease")
        os.kill(first.pid, signal.SIGSTOP)  # still holds its lock; the share stays still while it is stopped
        # a thread busy on a core stops only at its next trip through the kernel: wait until every one has, or it
        # may still finish a write after the snapshot below
        wait_until(lambda: _all_stopped(first.pid), 10, "every thread of the first coordinator to stop")
        before = tree(share)
        second = run(*coordinator(share, "--set", "min_workers=5"))
        assert second.returncode == 5 and "already driving" in second.stderr, second.stderr
        assert tree(share) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.terminate()
        finish(first, timeout=30)


@pytest.mark.processes
def test_refused_by_a_live_lease_from_another_host(share: Path) -> None:
    s = a_run(share, heartbeat=1, worker_timeout=3)
    before = tree(share)
    with foreign_lease_refreshed(s, every=0.5) as written:
        out = run(*coordinator(share, "--set", "heartbeat=1", "--set", "worker_timeout=3"), timeout=60)
    assert out.returncode == 5 and "refreshing its lease" in out.stderr, out.stderr
    after = tree(share) or {}
    assert after.pop("coordinator.yaml")[0] == written[-1], "only the other host wrote its lease"
    assert after == before
