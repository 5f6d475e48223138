"""One coordinator per share: the lease in coordinator.yaml, and the state it shows to `fedsync status`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fedsync.base.errors import ShareError
from fedsync.storage.lease import Lease
from fedsync.storage.markers import FORMAT_VERSION, Assignment, CoordinatorLease, Summary, parse, to_dict
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified

from .helpers import (
    finish,
    killed_on_error,
    read_yaml,
    register_worker,
    run,
    start,
    submit_update,
    wait_until,
    write_yaml,
)

FAST_LEASE = ("--set", "heartbeat=1", "--set", "worker_timeout=3")


def _foreign_lease(share: Share, beat: int) -> None:
    write_yaml(share.root / "coordinator.yaml", to_dict(CoordinatorLease(
        format=FORMAT_VERSION, run_id="x", owner="other-host:4242:abcd1234", host="other-host", pid=4242,
        heartbeat=beat, state="collecting", round=1, note="")))


@contextmanager
def foreign_lease_refreshed(share: Share, every: float) -> Iterator[list[bytes]]:
    """Another host's live coordinator: its lease, rewritten every `every` seconds until the block ends; yields
    the bytes of each version written."""
    written: list[bytes] = []
    stop = threading.Event()

    def beat(n: int) -> None:
        _foreign_lease(share, n)
        written.append((share.root / "coordinator.yaml").read_bytes())

    def refresh() -> None:
        n = 1
        while not stop.wait(every):
            n += 1
            beat(n)

    beat(1)
    t = threading.Thread(target=refresh)
    t.start()
    try:
        yield written
    finally:
        stop.set()
        t.join()


@pytest.mark.processes
def test_second_coordinator_on_this_host_is_refused(share: Path) -> None:
    first = start("coordinator", "--share", str(share), "--set", "min_workers=5")
    try:
        wait_until(lambda: (share / "coordinator.yaml").exists(), 60, "the first coordinator's lease")
        pid = parse(CoordinatorLease, read_yaml(share / "coordinator.yaml"), "lease").pid
        second = run("coordinator", "--share", str(share), "--set", "min_workers=5")
        assert second.returncode == 5 and f"pid {pid}" in second.stderr, second.stderr
    finally:
        first.terminate()
        finish(first, timeout=30)


@pytest.mark.processes
def test_live_lease_from_another_host_is_refused(share: Path) -> None:
    with foreign_lease_refreshed(Share(share), every=0.5):
        out = run("coordinator", "--share", str(share), *FAST_LEASE, timeout=60)
    assert out.returncode == 5 and "other-host" in out.stderr and "refreshing its lease" in out.stderr, out.stderr


def test_lease_check_refuses_a_lease_that_is_being_refreshed(share: Path) -> None:
    s = Share(share)
    with foreign_lease_refreshed(s, every=0.2), pytest.raises(ShareError, match="other-host.*refreshing its lease"):
        Lease(s, "run", refresh=0.2, timeout=2.0, log=lambda line: None).check()
    # once the refreshing stops, the same check takes over after one timeout
    lines: list[str] = []
    Lease(s, "run", refresh=0.2, timeout=1.0, log=lines.append).check()
    assert "taking over" in lines[-1]


@pytest.mark.processes
def test_dead_lease_from_another_host_is_taken_over(share: Path) -> None:
    s = Share(share)
    _foreign_lease(s, 7)
    coord = start("coordinator", "--share", str(share), "--rounds", "1", *FAST_LEASE)
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    out = finish(coord, timeout=120)
    finish(worker, timeout=30)
    assert coord.returncode == 0 and "taking over" in out, out
    lease = parse(CoordinatorLease, read_yaml(share / "coordinator.yaml"), "lease")
    assert lease.host != "other-host" and lease.state == "finished"


@pytest.mark.processes
def test_round_extended_at_its_deadline_shows_in_status(share: Path) -> None:
    s = Share(share)
    register_worker(s, "sleepy")
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", "min_workers=2",
                  "--set", "min_updates=2", "--set", "round_timeout=2", "--set", "worker_timeout=60")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, worker):
        def extended() -> bool:
            st = run("status", "--share", str(share), "--json")
            return st.returncode == 0 and json.loads(st.stdout)["state"].startswith("extended")
        wait_until(extended, 90, "the round to be extended")
        text = run("status", "--share", str(share)).stdout
        assert "extended: deadline passed" in text and "min_updates=2" in text
        a = parse(Assignment, s.read_yaml(s.assignment(1)), "a")  # the laptop wakes up and submits
        base = load_verified(s, s.global_model(1), a.model)
        submit_update(s, a, "sleepy", {k: torch.zeros_like(v) for k, v in base.items()}, samples=50)
    out = finish(coord, timeout=60)
    finish(worker, timeout=30)
    assert coord.returncode == 0, out
    summary = parse(Summary, s.read_yaml(s.summary(1)), "s")
    assert sorted(x.worker for x in summary.accepted) == ["sleepy", "w1"]
