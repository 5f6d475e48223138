"""Share trouble with the real kernel, one kind after each round of one run: the share's disk fills up, it is
remounted read-only, its permissions are taken away, it is unmounted and mounted again. Both roles report each
in one line naming the file, retry with backoff, leave no half-written file, write nothing into the bare mount
point, and finish once the share is back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsync.storage.markers import FinalMarker, parse
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, missing, run, start, wait_until

OUTAGE_S = 4.0  # long enough for both roles to meet the trouble (heartbeat and lease refresh every second)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        missing(f"needs mount(2) ({done.stderr.strip()}): run the tests as root (CI does)")


@pytest.fixture
def mounted_share(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real 16 MiB tmpfs (the store), bind-mounted at the share's path, as an NFS or SMB mount would be."""
    store, share = tmp_path / "store", tmp_path / "share"
    store.mkdir()
    share.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(store))
    try:
        _mount("--bind", str(store), str(share))
        try:
            yield store, share
        finally:
            subprocess.run(["umount", "-l", str(share)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


@dataclass
class Trouble:
    words: str                               # what the one-line report says
    start: Callable[[Path], None]
    end: Callable[[Path], None]


def _fill(share: Path) -> None:
    with open(share / "junk.bin", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _remount(share: Path, mode: str) -> None:
    """A mount refuses to turn read-only while a file on it is open for writing (EBUSY): retry a while."""
    end = time.monotonic() + 10
    while subprocess.run(["mount", "-o", f"remount,bind,{mode}", str(share)], capture_output=True).returncode:
        assert time.monotonic() < end, f"could not remount {share} {mode}"
        time.sleep(0.05)


def _chmod(share: Path, mode: str) -> None:
    for _ in range(2):  # a folder made during the first pass is caught by the second
        subprocess.run(["chmod", "-R", mode, str(share)], capture_output=True)


def _no_dac_override() -> tuple[str, ...]:
    """Root ignores permission bits; without these two capabilities it obeys them like any user."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        missing("needs setpriv (util-linux) to run fedsync as root without CAP_DAC_OVERRIDE")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def _troubles(store: Path) -> list[Trouble]:
    return [
        Trouble("the share's disk is full", _fill, lambda s: (s / "junk.bin").unlink()),
        Trouble("the share is mounted read-only", lambda s: _remount(s, "ro"), lambda s: _remount(s, "rw")),
        Trouble("permission denied", lambda s: _chmod(s, "a-w"), lambda s: _chmod(s, "u+w")),
        Trouble("a file or folder vanished (is the share unmounted?)",
                lambda s: subprocess.run(["umount", "-l", str(s)], check=True),
                lambda s: subprocess.run(["mount", "--bind", str(store), str(s)], check=True)),
    ]


@pytest.mark.processes
def test_share_trouble_of_every_kind_mid_run_is_survived(mounted_share: tuple[Path, Path]) -> None:
    store, share = mounted_share
    s = Share(share)
    troubles = _troubles(store)
    rounds = len(troubles) + 1
    wrap = _no_dac_override()
    coord = start("coordinator", "--share", str(share), "--rounds", str(rounds), "--set", "heartbeat=1",
                  "--set", "worker_timeout=30", wrap=wrap)
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60",
                   wrap=wrap)
    with killed_on_error(coord, worker):
        for r, trouble in enumerate(troubles, 1):
            wait_until(lambda: s.exists(s.summary(r)), 90, f"round {r} to close")
            trouble.start(share)
            time.sleep(OUTAGE_S)
            gave_up = [p.communicate()[0] for p in (coord, worker) if p.poll() is not None]
            assert not gave_up, f"a process gave up on '{trouble.words}':\n" + "\n".join(gave_up)
            if not os.path.ismount(share):
                assert list(share.iterdir()) == [], "something was written into the bare mount point"
            trouble.end(share)
        out = finish(coord, timeout=120)
        wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    for role, text in (("coordinator", out), ("worker", wout)):
        assert "Traceback" not in text, text
        for trouble in troubles:
            lines = [line for line in text.splitlines() if trouble.words in line]
            assert lines, f"the {role} did not report '{trouble.words}':\n{text}"
            by_task = Counter(m.group(1) if (m := re.search(r"while (.*?):", line)) else line for line in lines)
            for task, count in by_task.items():  # each writer (the coordinator's evaluation thread too) backs off
                assert count <= 8, f"the {role} reported '{trouble.words}' {count} times while {task}: no backoff"
            assert all(str(share) in line for line in lines), lines  # each line names the file it failed on
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "final").round == rounds
    verified = run("verify", "--share", str(share))
    assert verified.returncode == 0 and "0 error(s)" in verified.stdout, verified.stdout
    assert not [p for p in share.rglob("*") if p.name.endswith(".tmp")]
    subprocess.run(["umount", str(share)], check=True)
    assert list(share.iterdir()) == [], "something was written into the bare mount point"
