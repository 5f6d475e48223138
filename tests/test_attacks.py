"""An enrolled attacker through real processes: tests/independent_worker.py, written from docs/PROTOCOL.md alone,
registers with its own key and signs every update it sends, poisoned another way each round (its ATTACKS, in
order), beside four fedsync workers. With default settings the run ends as a clean one would (0.98-0.99 on digits,
docs/BENCHMARKS.md, less 2 points), IID and Dirichlet(0.5), and each attack that can be told apart from honest
training is rejected with its reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsync.storage.markers import FinalMarker, Summary, parse
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, run, start, wait_until

ATTACKER = Path(__file__).resolve().parent / "independent_worker.py"
ROUNDS = 12  # the attacker's cycle: eight attacks and an honest update every third round (or it is excluded)
CLEAN_LESS_2_POINTS = 0.96
# the rounds whose attack is caught outright (the others are clipped, or their buffers outvoted by the median)
CAUGHT = {1: {"off_direction"}, 2: {"invalid_state"}, 4: {"bad_samples"},
          5: {"invalid_state", "norm_outlier"},  # x1000: its variances go negative, or its norm is far too large
          7: {"norm_outlier"}}


@pytest.mark.processes
@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_one_enrolled_attacker_of_five_cannot_ruin_a_run_with_the_defaults(share: Path, tmp_path: Path,
                                                                          partition: str) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", str(ROUNDS), "--set", "min_workers=5",
                  "--set", f"partition={partition}")
    workers = [start("worker", "--share", str(share), "--name", f"w{i}", "--device", "cpu", "--wait-for-run", "60")
               for i in range(1, 5)]
    attacker = subprocess.Popen([sys.executable, str(ATTACKER), str(share), "mallory", str(tmp_path / "m.pem"),
                                 "cycle"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    with killed_on_error(coord, attacker, *workers):
        out = finish(coord, timeout=300)
        rest = "".join(finish(p, timeout=30) for p in (attacker, *workers))
    assert coord.returncode == 0, out + rest
    s = Share(share)
    for r in range(1, ROUNDS + 1):
        summary = parse(Summary, s.read_yaml(s.summary(r)), "summary")
        rejected = {x.worker: x.reason for x in summary.rejected}
        assert {x.worker for x in summary.accepted} >= {"w1", "w2", "w3", "w4"}, (r, rejected, out)
        if r in CAUGHT:
            assert set(rejected) == {"mallory"} and rejected["mallory"] in CAUGHT[r], (r, rejected, out)
        if r % 3 == 0:  # its honest rounds count
            assert rejected == {}, (r, rejected, out)
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.test_accuracy >= CLEAN_LESS_2_POINTS, out


@pytest.mark.processes
def test_an_attacker_rejected_three_rounds_in_a_row_is_excluded_and_shown_so(share: Path, tmp_path: Path) -> None:
    """exclude_after 3 (the default): the attacker overflows every batch count; after its third rejection it gets no
    work, trust.yaml says excluded, and `fedsync status` says why and how to trust it again."""
    coord = start("coordinator", "--share", str(share), "--rounds", "5", "--set", "min_workers=5")
    workers = [start("worker", "--share", str(share), "--name", f"w{i}", "--device", "cpu", "--wait-for-run", "60")
               for i in range(1, 5)]
    attacker = subprocess.Popen([sys.executable, str(ATTACKER), str(share), "mallory", str(tmp_path / "m.pem"),
                                 "overflow"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    s = Share(share)
    try:
        wait_until(lambda: s.exists(s.summary(3)), 120, "round 3 to close")
        wait_until(lambda: "excluded" in s.path(s.trust).read_text(), 30, "the attacker's exclusion")
        status = run("status", "--share", str(share))
    finally:
        for p in (coord, attacker, *workers):
            p.kill()
        out = "".join(finish(p, timeout=30) for p in (coord, attacker, *workers))
    for r in (1, 2, 3):
        rejected = {x.worker: x.reason for x in parse(Summary, s.read_yaml(s.summary(r)), "summary").rejected}
        assert rejected == {"mallory": "invalid_state"}, (r, rejected, out)
    assert "worker mallory: excluded, no more work: its updates were rejected in rounds 1-3 in a row " \
           "(invalid_state)" in out, out
    assert "mallory" in status.stdout and "excluded by the coordinator" in status.stdout, status.stdout
    assert not s.exists(s.summary(4))  # 4 of min_workers 5 are left: it says so and waits
