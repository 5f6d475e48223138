"""keep_rounds: a share that does not grow without bound, its coordinator killed between a summary and its removals."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedsync.storage.markers import FinalMarker, Summary
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, run, start

ROUNDS, KEEP = 6, 3
SETS = ("--set", f"keep_rounds={KEEP}", "--set", "min_workers=1", "--set", "local_epochs=1")


def _tensor_rounds(share: Path) -> list[int]:
    """Round folders that still hold a tensor file (an update sealed to the coordinator included)."""
    return sorted({int(p.relative_to(share).parts[0]) for p in share.glob("[0-9]*/**/*.safetensors*")})


@pytest.mark.processes
def test_keep_rounds_leaves_only_the_last_rounds_tensors_across_a_restart(share: Path) -> None:
    coord_args = ("coordinator", "--share", str(share), "--rounds", str(ROUNDS), *SETS)
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(worker):
        # killed right after the last round's summary, before its removals: the restart must make them
        doomed = start(*coord_args, fault=f"coordinator:after-summary:{ROUNDS}")
        out = finish(doomed, timeout=120)
        assert doomed.returncode == -signal.SIGKILL, out
        assert _tensor_rounds(share) == [3, 4, 5, 6]  # rounds 1-2 went after round 5's summary, round 3 is due
        coord = start(*coord_args)
        out += finish(coord, timeout=120)
        wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    s = Share(share)
    assert _tensor_rounds(share) == list(range(ROUNDS - KEEP + 1, ROUNDS + 1))  # the last three, and the final model
    assert (share / "final.safetensors").is_file()
    for r in range(1, ROUNDS + 1):  # every decision stays
        assert s.read_record(Summary, s.summary(r)).accepted and (share / s.update_marker(r, "w1")).is_file()
    final = s.read_record(FinalMarker, s.final_marker)
    assert final.round == ROUNDS

    verified = run("verify", "--share", str(share), "--json")
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["findings"] == [], verified.stdout
    assert report["pruned"] == 3 * 2 + 2  # rounds 1-3: global model and update; the aggregates of rounds 1 and 2
    status = run("status", "--share", str(share))
    assert status.returncode == 0 and "finished after round 6" in status.stdout
    assert f"keep_rounds {KEEP}: the tensors of rounds 1..{ROUNDS - KEEP} are removed" in status.stdout
    pruned = run("eval", "--share", str(share), "--round", "1")
    assert pruned.returncode == 5 and "removed by keep_rounds: 3" in pruned.stderr, pruned.stderr
