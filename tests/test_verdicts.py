"""Verdicts a person can act on: which workers stop getting work after their updates were rejected round after
round, and whether a round that cannot close failed because every worker diverges or because earlier updates
ruined the model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedsync.run.config import load_config
from fedsync.run.coordinating.verdicts import Quality, ruined, to_exclude
from fedsync.run.start import open_run
from fedsync.run.trust import Trust, read_trust
from fedsync.storage.lease import Lease
from fedsync.storage.manifest import finished
from fedsync.storage.markers import FORMAT_VERSION, FileRef, FinalMarker, Rejected, Summary, to_dict
from fedsync.storage.share import Share
from fedsync.storage.signing import final_message

from .helpers import coordinator_identity, register_worker, run, worker_identity


def _summary(r: int, rejected: dict[str, str]) -> Summary:
    return Summary(format=FORMAT_VERSION, round=r, closed_because="quorum", seconds=1.0,
                   model=FileRef("m", "0" * 64, 1), accepted=[], missing=[], ignored=[], late=[],
                   rejected=[Rejected(w, f"updates/{w}.yaml", why, "") for w, why in rejected.items()],
                   aggregation="fedavg", step_scale=1.0, metrics={}, timings={})


def test_a_worker_is_excluded_only_when_rejected_for_what_it_sent_every_round_of_the_window() -> None:
    rounds = [_summary(1, {"m": "off_direction", "slow": "missing_file"}),
              _summary(2, {"m": "invalid_state", "slow": "missing_file", "hot": "diverged"}),
              _summary(3, {"m": "norm_outlier", "slow": "hash_mismatch", "hot": "diverged", "once": "non_finite"})]
    assert to_exclude(rounds, 3) == {"m": "its updates were rejected in rounds 1-3 in a row (invalid_state, "
                                          "norm_outlier, off_direction)"}
    assert to_exclude(rounds[:2], 3) == {}  # too few rounds to tell
    assert set(to_exclude(rounds, 1)) == {"m", "once"}
    assert to_exclude(rounds, 0) == {}  # exclude_after 0: never
    rounds.append(_summary(4, {}))  # it sent a good one: the streak is broken
    assert to_exclude(rounds, 3) == {}


def test_a_ruined_model_is_told_apart_from_workers_that_diverge() -> None:
    fine = [Quality(1, 0.6, 1.2, ("a", "b")), Quality(2, 0.9, 0.4, ("a", "b")), Quality(3, 0.88, 0.5, ("a", "b"))]
    assert ruined(fine) == ""  # a little noise is no ruin
    fell = fine + [Quality(4, 0.3, 3.0, ("a", "m")), Quality(5, 0.078, math.nan, ("a", "b", "m"))]
    assert ruined(fell) == ("the model was ruined by updates accepted in rounds 3-5 (from a, b, m): test accuracy "
                            "0.900 after round 2, 0.078 (test loss nan) after round 5")
    assert "round 1 (from x)" in ruined([Quality(1, 0.1, math.inf, ("x",))])
    assert ruined([]) == ""


@pytest.mark.processes
def test_an_excluded_worker_gets_no_work_until_approved_again_and_status_says_why(share: Path) -> None:
    s = Share(share)
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator_identity())
    register_worker(s, "m")
    said: list[str] = []
    trust = Trust(s, manifest.run_id, coordinator_identity(), "tofu", lambda n: worker_identity(n).public, said.append)
    assert trust.admit_all(["m"]) == ["m"]  # pinned
    trust.exclude("m")
    entry = read_trust(s, manifest.run_id, coordinator_identity().public)["m"]
    assert (entry.key, entry.state) == (worker_identity("m").public, "excluded")
    assert trust.admit_all(["m"]) == [] and "excluded by the coordinator" in said[-1]
    status = run("status", "--share", str(share))
    assert "excluded by the coordinator" in status.stdout, status.stdout
    again = run("trust", "m", "--share", str(share), "--fingerprint", worker_identity("m").fingerprint)
    assert again.returncode == 0, again.stderr
    trust.refresh()
    assert trust.admit_all(["m"]) == ["m"]


def test_a_finished_run_being_extended_is_not_finished_for_workers(share: Path) -> None:
    """A worker started beside `fedsync coordinator --rounds 20` on a run that had finished after 10 must not see
    the old final.yaml and exit before the coordinator takes it away: the lease says rounds 20."""
    s = Share(share)
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator_identity())
    final = FinalMarker(format=FORMAT_VERSION, run_id=manifest.run_id, round=10, model=FileRef("final.safetensors",
                        "0" * 64, 1), test_accuracy=0.98)
    final.signature = coordinator_identity().sign(final_message(final))
    s.write_yaml(s.final_marker, to_dict(final))
    assert finished(s, manifest.run_id, coordinator_identity().public) == final
    lease = Lease(s, manifest.run_id, 2.0, 30.0, print, rounds=20)
    lease.update("waiting for workers")
    assert finished(s, manifest.run_id, coordinator_identity().public) is None  # driven to round 20
    lease.update("stopped")
    assert finished(s, manifest.run_id, coordinator_identity().public) == final  # nobody drives it now
