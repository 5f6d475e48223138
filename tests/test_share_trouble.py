"""Share trouble with the real kernel: the share's disk fills up mid-run. Both roles say so in one line,
retry with backoff, leave no half-written file, and finish once space is back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsync.markers import FinalMarker, parse
from fedsync.share import Share, read_yaml

from .conftest import finish, killed_on_error, run, start, wait_until


@pytest.fixture
def small_share(tmp_path: Path) -> Iterator[Path]:
    share = tmp_path / "share"
    share.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(share)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs mount(2) for a real 16 MiB tmpfs: run the tests as root (CI does) "
                    f"({mounted.stderr.decode().strip()})")
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


def _fill(share: Path) -> Path:
    junk = share / "junk.bin"
    with open(junk, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return junk


def test_disk_full_mid_run_is_survived(small_share: Path) -> None:
    s = Share(small_share)
    coord = start("coordinator", "--share", str(small_share), "--rounds", "3", "--set", "heartbeat=1",
                  "--set", "worker_timeout=30")
    worker = start("worker", "--share", str(small_share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, worker):
        wait_until(lambda: s.summary(1).exists(), 90, "round 1 to close")
        junk = _fill(small_share)
        time.sleep(4)  # both processes now meet ENOSPC and back off
        assert coord.poll() is None and worker.poll() is None, "a process gave up instead of retrying"
        junk.unlink()
    out = finish(coord, timeout=120)
    wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    assert "the share's disk is full" in out + wout
    assert "Traceback" not in out + wout
    assert parse(FinalMarker, read_yaml(s.final_marker), "final").round == 3
    verified = run("verify", "--share", str(small_share))
    assert verified.returncode == 0 and "0 error(s)" in verified.stdout, verified.stdout
    assert not [p for p in small_share.rglob("*") if p.name.endswith(".tmp")]
