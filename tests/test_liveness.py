"""Liveness by the coordinator's clock: heartbeats keep a long-training worker alive; a frozen worker gets no
new work, and rejoins when it wakes up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fedsync.storage.markers import Assignment, Summary, parse
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, start, wait_until

FAST = ("--set", "heartbeat=1", "--set", "worker_timeout=3")


def _worker(share: Path, name: str):
    return start("worker", "--share", str(share), "--name", name, "--device", "cpu", "--wait-for-run", "60")


@pytest.mark.processes
def test_training_longer_than_the_timeout_never_looks_dead(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", "min_workers=2",
                  "--set", "local_epochs=40", *FAST)
    workers = [_worker(share, n) for n in ("w1", "w2")]
    out = finish(coord, timeout=180)
    [finish(w, timeout=30) for w in workers]
    assert coord.returncode == 0, out
    s = parse(Summary, Share(share).read_yaml(Share.summary(1)), "s")
    assert max(x.seconds for x in s.accepted) > 3, "training must outlast worker_timeout for this test to mean much"
    assert sorted(x.worker for x in s.accepted) == ["w1", "w2"] and s.closed_because == "quorum"


@pytest.mark.processes
def test_frozen_worker_gets_no_work_and_rejoins_when_it_wakes(share: Path) -> None:
    s = Share(share)
    coord = start("coordinator", "--share", str(share), "--rounds", "14", "--set", "min_workers=2", *FAST)
    workers = {n: _worker(share, n) for n in ("w1", "w2", "w3")}

    def assigned(r: int) -> list[str]:
        return sorted(parse(Assignment, s.read_yaml(s.assignment(r)), "a").workers)

    def closed_with_w3() -> int | None:
        return next((r for r in s.rounds() if s.exists(s.summary(r)) and "w3" in assigned(r)), None)

    def opened_without_w3(after: int) -> int | None:
        return next((r for r in s.rounds() if r > after and s.exists(s.assignment(r)) and "w3" not in assigned(r)),
                    None)

    with killed_on_error(coord, *workers.values()):
        wait_until(lambda: closed_with_w3() is not None, 90, "a round to close with w3")  # w3 may join late
        os.kill(workers["w3"].pid, signal.SIGSTOP)  # a laptop lid closes
        joined = closed_with_w3() or 0
        wait_until(lambda: opened_without_w3(joined) is not None, 60, "a round opened without the frozen w3")
        frozen_round = opened_without_w3(joined)
        assert frozen_round is not None
        os.kill(workers["w3"].pid, signal.SIGCONT)  # ... and opens again
    out = finish(coord, timeout=120)
    for w in workers.values():
        finish(w, timeout=30)
    assert coord.returncode == 0, out
    assert assigned(frozen_round) == ["w1", "w2"]
    assert any(assigned(r) == ["w1", "w2", "w3"] for r in range(frozen_round + 1, 15)), out
