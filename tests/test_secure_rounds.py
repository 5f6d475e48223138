"""Secure aggregation with real processes (docs/PROTOCOL.md section 5.16): workers SIGKILLed after each step, a
worker and the coordinator killed and started again mid-round; each round closes with the survivors' sum, and no
file the coordinator reads holds one worker's update in the clear."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsync.run.config import load_config
from fedsync.run.start import open_run
from fedsync.storage import names
from fedsync.storage.markers import Assignment, FinalMarker, Summary, UpdateMarker, parse
from fedsync.storage.secagg_files import SecaggRoster
from fedsync.storage.share import Share
from fedsync.storage.yamlfile import parse_yaml
from fedsync.tensors.files import load_verified

from .helpers import coordinator_identity, finish, killed_on_error, run, start, wait_until

pytestmark = pytest.mark.processes
OUTSIDER = Path(__file__).resolve().parent / "independent_worker.py"
SECURE = ("--set", "secure_aggregation=true", "--set", "clip_norm=5", "--set", "worker_timeout=5",
          "--set", "heartbeat=1", "--set", "round_timeout=40")


def _worker(share: Path, name: str, fault: str | None = None):
    return start("worker", "--share", str(share), "--name", name, "--device", "cpu", "--wait-for-run", "60",
                 fault=fault)


def _summary(s: Share, r: int) -> Summary:
    return parse(Summary, s.read_yaml(s.summary(r)), "summary")


def _masked_inputs_are_masked(s: Share, r: int, workers: list[str]) -> None:
    """Every masked input the coordinator read is spread over the whole 32-bit range, as masked words are; an
    encoded update alone (weight x values x scale, far below 2^31) would sit near zero."""
    for w in workers:
        m = parse(UpdateMarker, s.read_yaml(s.update_marker(r, w)), "m")
        assert m.encoding == "secagg" and m.encryption == "none"
        words = load_verified(s, s.update_tensors(r, w), m.tensors)["masked"].numpy().astype(np.int64)
        assert np.mean(np.abs(words) > 2**30) > 0.4, (w, np.abs(words).mean())


def _moved_no_further_than_the_clip(s: Share, r: int) -> None:
    """The new model is the old one plus the mean of updates clipped to clip_norm (5): it moved at most that."""
    before = load_verified(s, s.global_model(r), s.read_record(Assignment, s.assignment(r)).model)
    summary = _summary(s, r)
    after = load_verified(s, summary.model.file, summary.model)
    moved = torch.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum() for k in before
                           if before[k].is_floating_point()))
    assert 0 < float(moved) <= 5.0 + 1e-3, float(moved)


def test_two_workers_killed_after_masking_do_not_stop_the_round(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "min_workers=5", *SECURE)
    workers = [_worker(share, f"w{i}") for i in (1, 2, 3)]
    doomed = [_worker(share, f"w{i}", fault="worker:after-marker:2") for i in (4, 5)]
    with killed_on_error(coord, *workers, *doomed):
        out = finish(coord, timeout=180)
        outs = "".join(finish(w, timeout=30) for w in workers)
        assert all(d.wait(timeout=30) == -signal.SIGKILL for d in doomed), out
    assert coord.returncode == 0 and all(w.returncode == 0 for w in workers), out + outs
    assert "Traceback" not in out + outs
    s = Share(share)
    two = _summary(s, 2)
    assert sorted(x.worker for x in two.accepted) == ["w1", "w2", "w3", "w4", "w5"], two  # their inputs count
    roster = s.read_record(SecaggRoster, names.secagg_roster(2, 3))
    assert roster.workers == ["w1", "w2", "w3", "w4", "w5"]
    assert not s.exists(names.secagg_reveal(2, "w4")) and not s.exists(names.secagg_reveal(2, "w5"))
    three = _summary(s, 3)
    assert sorted(x.worker for x in three.accepted) == ["w1", "w2", "w3"], three
    for r in (1, 2, 3):
        _masked_inputs_are_masked(s, r, [x.worker for x in _summary(s, r).accepted])
        _moved_no_further_than_the_clip(s, r)
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "final").test_accuracy >= 0.9, out
    assert run("verify", "--share", str(share)).returncode == 0
    status = run("status", "--share", str(share))
    assert "updates are masked (secure aggregation): the coordinator reads only each round's sum" in status.stdout


def test_workers_dropping_after_keys_and_after_sharing_and_restarts_mid_round(share: Path) -> None:
    """Round 1: w4 dies after publishing its keys, w5 after sealing its shares (its pairwise masks come out of the
    sum through the shares the others reveal). Round 2: the coordinator dies right after roster 2 and w3 right after
    its shares; both start again and the round goes on from the files."""
    s = Share(share)
    sets = dict(a.split("=") for a in SECURE[1::2]) | {"min_workers": "3"}
    open_run(s, load_config("digits", {k: parse_yaml(v.encode()) for k, v in sets.items()}), "coordinator",
             coordinator_identity())  # the run exists before its coordinator starts: the five workers join it first
    args = ("coordinator", "--share", str(share), "--rounds", "2", *(x for k, v in sets.items()
                                                                      for x in ("--set", f"{k}={v}")))
    steady = [_worker(share, f"w{i}") for i in (1, 2)]
    w3 = _worker(share, "w3", fault="worker:secure-shares:2")
    doomed = [_worker(share, "w4", fault="worker:secure-keys:1"), _worker(share, "w5", fault="worker:secure-shares:1")]
    with killed_on_error(*steady, w3, *doomed):
        wait_until(lambda: len(s.list(s.workers_dir)) == 5, 60, "the five workers to register")  # all in round 1
        coord = start(*args, fault="coordinator:secure-roster-2:2")
    with killed_on_error(coord, *steady, w3, *doomed):
        assert all(d.wait(timeout=90) == -signal.SIGKILL for d in doomed)
        wait_until(lambda: s.exists(s.summary(1)), 90, "round 1 to close without w4 and w5")
        assert w3.wait(timeout=60) == -signal.SIGKILL
        assert coord.wait(timeout=60) == -signal.SIGKILL
        w3 = _worker(share, "w3")  # the same secrets from its own disk: it continues round 2
        coord = start(*args)
        out = finish(coord, timeout=120)
        outs = "".join(finish(w, timeout=30) for w in (*steady, w3))
    assert coord.returncode == 0, out + outs
    one = _summary(s, 1)
    assert sorted(x.worker for x in one.accepted) == ["w1", "w2", "w3"], one
    assert {x.worker: x.reason for x in one.rejected} == {"w4": "secure_step", "w5": "secure_step"}, one.rejected
    assert s.read_record(SecaggRoster, names.secagg_roster(1, 2)).workers == ["w1", "w2", "w3", "w5"]
    revealed = s.read_yaml(names.secagg_reveal(1, "w1"))["shares"]
    assert revealed["w5"].startswith("pair:") and revealed["w2"].startswith("self:")  # never both of one sender
    two = _summary(s, 2)
    assert sorted(x.worker for x in two.accepted) == ["w1", "w2", "w3"], two
    for r in (1, 2):
        _masked_inputs_are_masked(s, r, [x.worker for x in _summary(s, r).accepted])
        _moved_no_further_than_the_clip(s, r)
    assert "Traceback" not in out + outs


def test_an_outsiders_worker_written_from_the_document_takes_every_secure_step(share: Path, tmp_path: Path) -> None:
    """tests/independent_worker.py (section 5.16 alone, nothing of fedsync) beside fedsync workers: its masked
    input, envelopes and revealed shares count in every round."""
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "min_workers=4", *SECURE)
    workers = [_worker(share, f"w{i}") for i in (1, 2, 3)]
    outsider = subprocess.Popen([sys.executable, str(OUTSIDER), str(share), "outsider", str(tmp_path / "o.pem")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    with killed_on_error(coord, *workers, outsider):
        out = finish(coord, timeout=180)
        outs = "".join(finish(w, timeout=30) for w in workers) + finish(outsider, timeout=30)
    assert coord.returncode == 0 and outsider.returncode == 0, out + outs
    s = Share(share)
    for r in (1, 2, 3):
        summary = _summary(s, r)
        assert sorted(x.worker for x in summary.accepted) == ["outsider", "w1", "w2", "w3"], (summary, out)
        assert s.exists(names.secagg_keys(r, "outsider")) and s.exists(names.secagg_shares(r, "outsider"))
        _masked_inputs_are_masked(s, r, ["outsider", "w1"])
        _moved_no_further_than_the_clip(s, r)
    # round 2 dips (0.68) as the same clipped plain run's does (0.71), round 3 recovers
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "final").test_accuracy >= 0.9, out


@pytest.mark.parametrize("step", [1, 3])
def test_a_coordinator_killed_after_a_roster_continues_the_round_from_the_files(share: Path, step: int) -> None:
    """(Roster 2: the test above.) With a server optimizer and federated evaluation, which work as in plain rounds."""
    args = ("coordinator", "--share", str(share), "--rounds", "1", "--set", "min_workers=3", "--set",
            "server_optimizer=fedavgm", "--set", "federated_eval=0.2", *SECURE)
    coord = start(*args, fault=f"coordinator:secure-roster-{step}:1")
    workers = [_worker(share, f"w{i}") for i in (1, 2, 3)]
    s = Share(share)
    with killed_on_error(coord, *workers):
        assert coord.wait(timeout=90) == -signal.SIGKILL
        assert s.exists(names.secagg_roster(1, step)) and not s.exists(s.summary(1))
        coord = start(*args)
        out = finish(coord, timeout=120)
        outs = "".join(finish(w, timeout=30) for w in workers)
    assert coord.returncode == 0 and "Traceback" not in out + outs, out + outs
    summary = _summary(s, 1)
    assert sorted(x.worker for x in summary.accepted) == ["w1", "w2", "w3"], summary
    assert summary.server_optimizer == "fedavgm" and summary.server_state is not None
    assert summary.federated is not None and summary.federated.samples > 0
    _masked_inputs_are_masked(s, 1, ["w1", "w2", "w3"])
