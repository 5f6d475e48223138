"""Differential privacy with real processes: a run that spends its budget ends with a signed final model and the
reason, a coordinator killed between a round's model and its summary charges that round twice, a restart never
reopens a spent run; distributed noise through secure aggregation; DP-SGD on the workers with their epsilon in
their markers. Each epsilon is checked against dp-accounting's for the same releases."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsync.aggregation.privacy.accounting import Release, epsilon
from fedsync.run.working.private import rate
from fedsync.storage.manifest import finished, read_manifest
from fedsync.storage.markers import FinalMarker, Summary, UpdateMarker
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, run, start, wait_until

pytestmark = pytest.mark.processes
COMMON = ("--set", "model=digits_cnn_gn", "--set", "clip_norm=0.005", "--set", "min_workers=2", "--set",
          "worker_timeout=10", "--set", "heartbeat=1", "--set", "round_timeout=60")


def _worker(share: Path, name: str):  # type: ignore[no-untyped-def]
    return start("worker", "--share", str(share), "--name", name, "--device", "cpu", "--wait-for-run", "60")


def test_a_run_ends_at_its_budget_with_a_signed_final_model_and_never_reopens(share: Path) -> None:
    # z 1.5 at sampling rate 1: 4 releases spend 6.60, 5 would spend 7.53. Round 2 is charged twice (its model was
    # written before the coordinator died), so the budget of 7 ends the run after round 3.
    cmd = ("coordinator", "--share", str(share), "--rounds", "10", *COMMON, "--set", "dp.noise_multiplier=1.5",
           "--set", "dp.target_epsilon=7")
    first = start(*cmd, fault="coordinator:before-summary:2")
    workers = [_worker(share, f"w{i}") for i in (1, 2)]
    with killed_on_error(first, *workers):
        out = finish(first, timeout=120)
        assert first.returncode == -9, out
        second = start(*cmd)
        out += finish(second, timeout=120)
        outs = "".join(finish(w, timeout=60) for w in workers)
    assert second.returncode == 0 and all(w.returncode == 0 for w in workers), out + outs
    assert "Traceback" not in out + outs
    s = Share(share)
    summaries = [s.read_record(Summary, s.summary(r)) for r in (1, 2, 3)]
    assert [x.privacy.releases for x in summaries] == [1, 2, 1]  # type: ignore[union-attr]
    for k, x in enumerate(summaries, 1):
        assert x.privacy is not None and x.privacy.sample_rate == 1.0 and x.privacy.denominator == 2
        assert x.privacy.epsilon == pytest.approx(epsilon([Release(1.0, 1.5, k + (k >= 2))], 1e-5), abs=1e-5)
        assert all(a.norm is None and not a.clipped and a.weight == 1.0 for a in x.accepted)
    final = finished(s, read_manifest(s).run_id, read_manifest(s).coordinator_key)  # signed by the coordinator
    assert final is not None and final.round == 3 and final.model.blake3 == summaries[2].model.blake3
    assert "target_epsilon 7" in (final.stopped_because or "") and final.epsilon == summaries[2].privacy.epsilon
    assert s.closed_rounds() == [1, 2, 3] and s.rounds() == [1, 2, 3, 4]  # round 4 holds round 3's aggregate alone
    assert not s.exists(s.assignment(4)) and s.exists(s.global_model(4))
    assert "ends after round 3 of 10: privacy budget" in out
    rows = (share / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",epsilon") and rows[-1].endswith(f",{summaries[2].privacy.epsilon:.6f}")
    status = run("status", "--share", str(share)).stdout
    assert "epsilon 6.604" in status and "ended before its last round: privacy budget" in status, status
    assert "epsilon" in run("results", "--share", str(share)).stdout
    assert run("verify", "--share", str(share)).returncode == 0
    before = (share / "final.yaml").read_bytes()
    again = run(*cmd, timeout=60)  # a restart: nothing reopens, nothing is spent
    assert again.returncode == 0 and "already ended after round 3" in again.stdout + again.stderr
    assert s.rounds() == [1, 2, 3, 4] and not s.exists(s.assignment(4))
    assert (share / "final.yaml").read_bytes() == before


def test_distributed_noise_through_secure_aggregation_and_a_finished_run_extended(share: Path) -> None:
    settings = (*COMMON, "--set", "min_workers=3", "--set", "secure_aggregation=true", "--set",
                "dp.noise_multiplier=0.5", "--set", "dp.noise=distributed")
    for rounds in (2, 3):  # then extended by a round: its final.safetensors is the old final's, not a seen release
        coord = start("coordinator", "--share", str(share), "--rounds", str(rounds), *settings)
        wait_until(lambda: not (share / "final.yaml").exists(), 60, "the finished run's final.yaml taken away")
        workers = [_worker(share, f"w{i}") for i in (1, 2, 3)]
        with killed_on_error(coord, *workers):
            out = finish(coord, timeout=180)
            outs = "".join(finish(w, timeout=60) for w in workers)
        assert coord.returncode == 0 and all(w.returncode == 0 for w in workers), out + outs
    s = Share(share)
    for r in (1, 2, 3):
        p = s.read_record(Summary, s.summary(r)).privacy
        assert p is not None and (p.noise, p.noise_multiplier, p.denominator) == ("distributed", 0.5, 3)
        assert p.releases == 1 and p.epsilon == pytest.approx(epsilon([Release(1.0, 0.5, r)], 1e-5), abs=1e-5)
        m = s.read_record(UpdateMarker, s.update_marker(r, "w1"))
        assert m.encoding == "secagg"
    assert s.read_record(FinalMarker, s.final_marker).epsilon == pytest.approx(epsilon([Release(1.0, 0.5, 3)], 1e-5))


def test_dp_sgd_on_each_worker_puts_its_epsilon_in_its_markers(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "2", *COMMON[:2], *COMMON[4:],
                  "--set", "worker_dp.noise_multiplier=1.1", "--set", "worker_dp.max_grad_norm=1.0")
    workers = [_worker(share, f"w{i}") for i in (1, 2)]
    with killed_on_error(coord, *workers):
        out = finish(coord, timeout=180)
        outs = "".join(finish(w, timeout=60) for w in workers)
    assert coord.returncode == 0 and all(w.returncode == 0 for w in workers), out + outs
    assert "worker_dp: DP-SGD (Opacus)" in outs
    s = Share(share)
    for w in ("w1", "w2"):
        markers = [s.read_record(UpdateMarker, s.update_marker(r, w)) for r in (1, 2)]
        releases = [Release(rate(m.samples, 32), 1.1, m.steps) for m in markers]
        assert markers[0].worker_epsilon == pytest.approx(epsilon(releases[:1], 1e-5), abs=1e-5)
        assert markers[1].worker_epsilon == pytest.approx(epsilon(releases, 1e-5), abs=1e-5)
        assert markers[1].worker_epsilon > markers[0].worker_epsilon > 0
