"""Share trouble with the real kernel, mid-run: the share's disk fills up, it is remounted read-only, its
permissions are taken away, or it is unmounted and mounted again. Both roles report each in one line, retry
with backoff, leave no half-written file, write nothing into the bare mount point, and finish once the share
is back."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsync.markers import FinalMarker, parse
from fedsync.share import Share, read_yaml

from .conftest import finish, killed_on_error, missing, run, start, wait_until

OUTAGE_S = 4.0  # long enough for both roles to meet the trouble (heartbeat and lease refresh every second)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        missing(f"needs mount(2) ({done.stderr.strip()}): run the tests as root (CI does)")


@pytest.fixture
def small_share(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs."""
    share = tmp_path / "share"
    share.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(share))
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


@dataclass
class Trouble:
    words: str                               # what the one-line report says
    start: Callable[[Path], None]
    end: Callable[[Path], None]
    wrap: tuple[str, ...] = ()               # how the fedsync processes run


def _fill(share: Path) -> None:
    with open(share / "junk.bin", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _remount(share: Path, mode: str) -> None:
    """tmpfs refuses to turn read-only while a file is open for writing (EBUSY): retry for a few seconds."""
    end = time.monotonic() + 10
    while subprocess.run(["mount", "-o", f"remount,{mode}", str(share)], capture_output=True).returncode:
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


TROUBLES = {
    "disk full": Trouble("the share's disk is full", _fill, lambda s: (s / "junk.bin").unlink()),
    "read-only": Trouble("the share is mounted read-only", lambda s: _remount(s, "ro"), lambda s: _remount(s, "rw")),
    "permission": Trouble("permission denied", lambda s: _chmod(s, "a-w"), lambda s: _chmod(s, "u+w")),
}


def _trouble_lines(out: str, words: str) -> list[str]:
    return [line for line in out.splitlines() if words in line]


def _survive(share: Path, trouble: Trouble, outage: Callable[[], None] | None = None) -> tuple[str, str]:
    """A 3-round run through an outage of the share after round 1; returns both roles' output."""
    s = Share(share)
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "heartbeat=1",
                  "--set", "worker_timeout=30", wrap=trouble.wrap)
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60",
                   wrap=trouble.wrap)
    with killed_on_error(coord, worker):
        wait_until(lambda: s.summary(1).exists(), 90, "round 1 to close")
        trouble.start(share)
        (outage or (lambda: time.sleep(OUTAGE_S)))()
        assert coord.poll() is None and worker.poll() is None, "a process gave up instead of retrying"
        trouble.end(share)
        out = finish(coord, timeout=120)
        wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    for role, text in (("coordinator", out), ("worker", wout)):
        lines = _trouble_lines(text, trouble.words)
        assert lines, f"the {role} did not report '{trouble.words}':\n{text}"
        assert len(lines) <= 8, f"the {role} reported the trouble {len(lines)} times instead of backing off"
        assert all(str(share) in line for line in lines), lines  # each line names the file it failed on
        assert "Traceback" not in text, text
    assert parse(FinalMarker, read_yaml(s.final_marker), "final").round == 3
    verified = run("verify", "--share", str(share))
    assert verified.returncode == 0 and "0 error(s)" in verified.stdout, verified.stdout
    assert not [p for p in share.rglob("*") if p.name.endswith(".tmp")]
    return out, wout


@pytest.mark.parametrize("kind", list(TROUBLES))
def test_share_trouble_mid_run_is_survived(small_share: Path, kind: str) -> None:
    trouble = TROUBLES[kind]
    if kind == "permission":
        trouble.wrap = _no_dac_override()
    _survive(small_share, trouble)


def test_share_unmounted_and_mounted_again_is_survived(tmp_path: Path) -> None:
    """A bind mount of a folder stands in for an NFS or SMB mount that drops and comes back: while it is
    gone, the share's path is a bare, empty mount point, and nothing may be written there."""
    store, share = tmp_path / "store", tmp_path / "share"
    store.mkdir()
    share.mkdir()
    _mount("--bind", str(store), str(share))
    try:
        trouble = Trouble("a file or folder vanished (is the share unmounted?)",
                          lambda s: subprocess.run(["umount", "-l", str(s)], check=True),
                          lambda s: subprocess.run(["mount", "--bind", str(store), str(s)], check=True))

        def outage() -> None:
            time.sleep(OUTAGE_S)
            assert list(share.iterdir()) == [], "something was written into the bare mount point"

        _survive(share, trouble, outage)
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)
    assert list(share.iterdir()) == [], "something was written into the bare mount point"
