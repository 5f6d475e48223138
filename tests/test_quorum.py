"""The quorum closes a round early: a fraction of the live assigned workers, or a count, with real processes.

Silent registered workers ("ghosts") stay live for the whole test and never report, so without the quorum the
round could only close at its deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsync.run.coordinating.intake import quorum_target
from fedsync.storage.markers import Assignment, Summary, UpdateMarker, parse
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified

from .helpers import finish, killed_on_error, register_worker, start, wait_until

DEADLINE_S = 60  # round_timeout: only the quorum can close the round before it
CLOSE_S = 15     # two digits workers train and submit in about 2 s once the round is open


@pytest.mark.parametrize("quorum, live_assigned, min_updates, expected", [
    (1.0, 3, 1, 3), (0.6, 3, 1, 2), (0.5, 4, 1, 2), (0.01, 4, 1, 1), (0.5, 5, 1, 3),
    (2, 4, 1, 2), (5, 3, 1, 3), (1, 4, 1, 1),
    (0.5, 4, 3, 3), (1, 4, 2, 2),   # never below min_updates
    (1.0, 0, 1, 1),
])
def test_quorum_target(quorum: int | float, live_assigned: int, min_updates: int, expected: int) -> None:
    assert quorum_target(quorum, live_assigned, min_updates) == expected


@pytest.mark.processes
@pytest.mark.parametrize("quorum, ghosts, sealed", [("0.6", 1, True), ("2", 2, False)])  # ceil(0.6 x 3) = 2; 2 of 4
def test_quorum_closes_the_round_before_every_live_worker_reports(share: Path, quorum: str, ghosts: int,
                                                                  sealed: bool) -> None:
    """(With confidential_updates, the default, and without it: then the updates are plain safetensors files.)"""
    s = Share(share)
    names = [f"ghost{i}" for i in range(ghosts)]
    for name in names:
        register_worker(s, name)
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", f"quorum={quorum}",
                  "--set", f"min_workers={2 + ghosts}", "--set", f"round_timeout={DEADLINE_S}",
                  "--set", "worker_timeout=120", "--set", f"confidential_updates={str(sealed).lower()}")
    workers = [start("worker", "--share", str(share), "--name", n, "--device", "cpu", "--wait-for-run", "60")
               for n in ("w1", "w2")]
    with killed_on_error(coord, *workers):
        wait_until(lambda: s.exists(s.assignment(1)), 60, "round 1 to open")
        wait_until(lambda: s.exists(s.summary(1)), CLOSE_S, "the quorum to close round 1 long before its deadline")
        out = finish(coord, timeout=60)
        outs = [finish(w, timeout=30) for w in workers]
    assert coord.returncode == 0, out + "".join(outs)
    summary = parse(Summary, s.read_yaml(s.summary(1)), "summary")
    assert summary.closed_because == "quorum", summary
    assert sorted(x.worker for x in summary.accepted) == ["w1", "w2"]
    assert summary.missing == names and summary.seconds < DEADLINE_S
    for w in ("w1", "w2"):
        assert s.exists(s.update_tensors(1, w, sealed=sealed)) and not s.exists(s.update_tensors(1, w, not sealed))
        if not sealed:  # a plain update: a safetensors file anyone who reads the share can load
            marker, a = s.read_record(UpdateMarker, s.update_marker(1, w)), s.read_record(Assignment, s.assignment(1))
            update = load_verified(s, s.update_tensors(1, w), marker.tensors)
            assert marker.encryption == "none" and set(update) == set(load_verified(s, s.global_model(1), a.model))
