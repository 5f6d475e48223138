"""Kill any process at a named point with SIGKILL, start it again with the same command: the run completes,
with the expected rounds, nothing counted twice, and no partial file taken for whole."""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path

import pytest

from fedsync.storage.markers import FinalMarker, Summary, parse
from fedsync.storage.share import Share

from .helpers import finish, run, start

ROUNDS = 4
COORD = ("coordinator", "--rounds", str(ROUNDS), "--set", "min_workers=2")


def worker_args(share: Path, name: str) -> tuple[str, ...]:
    return ("worker", "--share", str(share), "--name", name, "--device", "cpu", "--wait-for-run", "60")


def closed_summaries(s: Share) -> dict[int, tuple[int, bytes]]:
    return {r: (s.path(s.summary(r)).stat().st_ino, s.path(s.summary(r)).read_bytes())
            for r in s.rounds() if s.exists(s.summary(r))}


def check_complete(s: Share) -> None:
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.round == ROUNDS and final.test_accuracy > 0.8
    rows = [int(r["round"]) for r in csv.DictReader(s.path(s.metrics).open())]
    assert rows == list(range(1, ROUNDS + 1))
    for r in range(1, ROUNDS + 1):
        summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
        assert sorted(a.worker for a in summary.accepted) == ["w1", "w2"], (r, summary)
    leftovers = [p for p in s.root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    verified = run("verify", "--share", str(s.root))
    assert verified.returncode == 0 and "0 error(s), 0 hint(s)" in verified.stdout, verified.stdout


COORDINATOR_FAULTS = [  # in the order a run meets them
    "coordinator:collecting:2",          # waiting for updates, one already taken in
    "write:0003/global.safetensors",     # in the middle of writing round 2's aggregate
    "write:0002/summary.yaml",           # in the middle of writing the decision itself
    "coordinator:after-summary:2",       # between the summary and the next round
    "write:final.safetensors",           # in the middle of writing the final model
]


@pytest.mark.processes
def test_coordinator_killed_at_each_point_and_restarted(share: Path) -> None:
    """One run, its coordinator killed at each point in turn and started again with the same command each time (the
    workers stay up throughout): every restart goes on from the share, and no closed round is aggregated again."""
    s = Share(share)
    workers = [start(*worker_args(share, n)) for n in ("w1", "w2")]
    try:
        for fault in COORDINATOR_FAULTS:
            before = closed_summaries(s)
            doomed = start(*COORD[:1], "--share", str(share), *COORD[1:], fault=fault)
            out = finish(doomed, timeout=120)
            assert doomed.returncode == -signal.SIGKILL, f"the fault {fault} was never reached:\n{out}"
            after = closed_summaries(s)
            assert {r: after[r] for r in before} == before, f"a closed round was aggregated again before {fault}"
        before = closed_summaries(s)
        restarted_at = time.monotonic()
        coord = start(*COORD[:1], "--share", str(share), *COORD[1:])
        out = finish(coord, timeout=120)
        outs = [finish(w, timeout=60) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert coord.returncode == 0 and all(w.returncode == 0 for w in workers), out + "".join(outs)
    assert time.monotonic() - restarted_at < 60
    after = closed_summaries(s)
    assert {r: after[r] for r in before} == before, "a closed round was aggregated again"
    check_complete(s)


@pytest.mark.processes
def test_worker_killed_mid_upload_and_restarted(share: Path) -> None:
    """w1 killed in the middle of writing its round 2 tensors, then, started again, between its round 3 tensors and
    marker: nothing of either partial upload counts, and each restart submits the round again."""
    s = Share(share)
    coord = start(*COORD[:1], "--share", str(share), *COORD[1:])
    w2 = start(*worker_args(share, "w2"))
    try:
        for r, fault in ((2, "write:0002/updates/w1.safetensors.age"), (3, "worker:after-tensors:3")):
            doomed = start(*worker_args(share, "w1"), fault=fault)
            out = finish(doomed, timeout=120)
            assert doomed.returncode == -signal.SIGKILL, f"the fault {fault} was never reached:\n{out}"
            assert not s.exists(s.update_marker(r, "w1"))  # nothing of the partial upload counts
        # as if the kill had landed while w1's heartbeat was writing its worker file: the restart sweeps it
        (share / "workers" / ".w1.yaml.0123456789ab.tmp").write_text("state: idl")
        w1 = start(*worker_args(share, "w1"))
        outs = [finish(coord, timeout=120), finish(w1, timeout=60), finish(w2, timeout=60)]
    finally:
        for p in (coord, w2):
            p.kill()
    assert coord.returncode == 0 and w1.returncode == 0 and w2.returncode == 0, "".join(outs)
    check_complete(s)
