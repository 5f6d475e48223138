"""A round's intake on its own (fedsync/run/coordinating/intake.py), on a real share with real signed updates: what
the collecting loop asks of it (scan, take, decide, aggregate) and the record it closes the round with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsync.aggregation.optimizers import make_optimizer
from fedsync.aggregation.rules import FedAvg
from fedsync.base.errors import RunStuck
from fedsync.run.config import load_config, load_data
from fedsync.run.coordinating.intake import RoundIntake
from fedsync.run.coordinating.ledger import Bound, RoundLedger
from fedsync.run.coordinating.planning import Planner
from fedsync.run.start import open_run
from fedsync.run.trust import Trust
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, WorkerTask, to_dict
from fedsync.storage.share import Share
from fedsync.tensors.files import save_state

from .helpers import coordinator_identity, coordinator_opener, submit_update, worker_identity, write_yaml

WORKERS = ("w1", "w2", "w3")
BASE = {"w": torch.full((4,), 2.0), "b": torch.zeros(2)}


def _round(tmp_path: Path, budget: float = 60.0, **overrides: Any) -> tuple[Share, Assignment, RoundIntake]:
    """Round 1 of a run, opened with three assigned workers whose keys are trusted; its intake."""
    s = Share(tmp_path)
    cfg = load_config("digits", overrides)
    open_run(s, cfg, "coordinator", coordinator_identity())
    ref = save_state(s.store.write, s.global_model(1), BASE)
    a = Assignment(format=FORMAT_VERSION, run_id="x", round=1, rounds=5, model=ref, num_shards=3,
                   time_budget_s=budget,
                   workers={w: WorkerTask(shard=i, local_epochs=1) for i, w in enumerate(WORKERS)},
                   shards=FileRef("shards/003.safetensors", "cd" * 32, 10))
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    said: list[str] = []
    trust = Trust(s, "x", coordinator_identity(), "tofu", lambda n: worker_identity(n).public, said.append)
    assert trust.admit_all(WORKERS) == list(WORKERS)
    bounds = lambda a, w: Bound(1000, 1000, "the test's bound")  # noqa: E731
    return s, a, RoundIntake(s, 1, a, dict(BASE), cfg, bounds, FedAvg(), trust, said.append, {},
                             opener=coordinator_opener())


def _update(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), value), "b": torch.full((2,), value)}


def test_scan_take_decide_aggregate_close_the_round_with_the_weighted_mean(tmp_path: Path) -> None:
    s, a, intake = _round(tmp_path, quorum=2)
    submit_update(s, a, "w1", _update(1.0), samples=100)
    submit_update(s, a, "w2", _update(4.0), samples=300)
    assert intake.decide(set(WORKERS)).reason == ""  # nothing taken in yet
    candidates = intake.scan()
    assert sorted(c.worker for c in candidates) == ["w1", "w2"]
    intake.take(candidates)
    assert intake.scan() == []  # decided: not read again
    decision = intake.decide(set(WORKERS))
    assert (decision.reason, decision.target) == ("quorum", 2)
    optimizer = make_optimizer(load_config("digits").server_settings(), frozenset({"w"}))
    closing = intake.aggregate(decision.reason, dict(BASE), optimizer, {})
    intake.close()
    assert closing is not None and closing.reason == "quorum" and closing.round == 1
    mean = (1.0 * 100 + 4.0 * 300) / 400
    torch.testing.assert_close(closing.new_state["w"], torch.full((4,), 2.0 + mean))
    torch.testing.assert_close(closing.new_state["b"], torch.full((2,), (1.0 + 4.0) / 2))  # a buffer: the median
    assert [x.worker for x in closing.accepted] == ["w1", "w2"] and closing.missing == ["w3"]
    assert closing.rejected == [] and closing.clipped == {}
    assert closing.accepted[1].norm == pytest.approx(4.0 * 6 ** 0.5, rel=1e-6)  # measured while it was read


def test_the_closing_rules_in_order_and_a_round_that_cannot_close(tmp_path: Path) -> None:
    s, a, intake = _round(tmp_path, budget=0.2, min_updates=2)
    submit_update(s, a, "w1", _update(1.0))
    intake.take(intake.scan())
    assert intake.decide({"w1"}).reason == ""  # quorum 1.0 of the live assigned (one) is not min_updates=2
    time.sleep(0.25)
    first = intake.decide({"w1", "w2"})
    assert first.reason == "" and "fewer than min_updates=2" in first.note
    assert intake.decide({"w1", "w2"}).note == ""  # the extension is said once
    submit_update(s, a, "w2", _update(float("nan")))  # rejected non_finite: w3 is all that is left
    intake.take(intake.scan())
    assert intake.ledger.rejected["w2"].reason == "non_finite"
    with pytest.raises(RunStuck, match="round 1 cannot close: every live assigned worker's update was rejected "
                                       r"\(w2: non_finite .*start a new share with a lower lr"):
        intake.decide({"w2"})  # the only live assigned worker was rejected, one update short of min_updates
    verdict = "the model was ruined by updates accepted in round 3 (from m)"
    with pytest.raises(RunStuck) as ruined:  # not the lr: earlier accepted updates ruined the model
        intake.decide({"w2"}, lambda: verdict)
    assert verdict in str(ruined.value) and "`fedsync trust NAME --revoke`" in str(ruined.value)
    assert "lower lr" not in str(ruined.value)
    submit_update(s, a, "w3", _update(2.0))
    intake.take(intake.scan())
    assert intake.decide(set(WORKERS)).reason == "all_reported"
    intake.close()


def test_a_non_finite_aggregate_takes_the_largest_update_out(tmp_path: Path) -> None:
    s, a, intake = _round(tmp_path, quorum=2, screen_factor=0, screen_max_ratio=0)
    submit_update(s, a, "w1", _update(1.0))
    submit_update(s, a, "w2", _update(3e38))  # finite, but 100 x it is not in float32
    intake.take(intake.scan())
    optimizer = make_optimizer(load_config("digits").server_settings(), frozenset({"w"}))
    assert intake.aggregate("quorum", dict(BASE), optimizer, {}) is None
    assert intake.ledger.rejected["w2"].reason == "spoils_aggregate"
    closing = intake.aggregate("quorum", dict(BASE), optimizer, {})
    intake.close()
    assert closing is not None and [x.worker for x in closing.accepted] == ["w1"]
    torch.testing.assert_close(closing.new_state["w"], torch.full((4,), 3.0))


def test_a_claim_is_bounded_by_the_shard_it_was_given(tmp_path: Path) -> None:
    """An enrolled worker claimed the whole training set (1,438) from a shard of about 290 and its update weighed
    five times an honest one. A claim may not exceed the rows of its shard it trains on (its held-out part for
    federated evaluation excluded), nor steps x batch_size with local_steps."""
    s = Share(tmp_path)
    cfg = load_config("digits", {"federated_eval": 0.2})
    open_run(s, cfg, "coordinator", coordinator_identity())
    dataset, _ = load_data(cfg, None, print)
    planner = Planner(s, cfg, cfg.resolved_task(), dataset, None, print)  # type: ignore[arg-type]
    shards, listed = planner.cut(5)
    a = Assignment(format=FORMAT_VERSION, run_id="x", round=1, rounds=5, model=FileRef("global.safetensors", "ab" * 32,
                   1), num_shards=5, time_budget_s=60.0, shards=listed,
                   workers={"w0": WorkerTask(shard=0, local_epochs=2),
                            "w1": WorkerTask(shard=1, local_epochs=2, local_steps=3)})
    kept = len(shards[0]) - len(shards[0]) // 5  # one in five held out
    assert planner.bound(a, "w0").train == kept and planner.bound(a, "w0").total == len(shards[0]) < 300
    assert planner.bound(a, "w0").of == f"shard 0 of 5 holds {kept} examples to train on"
    assert planner.bound(a, "w1").train == 3 * cfg.batch_size and "3 steps of 32 train on at most 96" in \
        planner.bound(a, "w1").of
    a.model = save_state(s.store.write, s.global_model(1), BASE)
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    trust = Trust(s, "x", coordinator_identity(), "tofu", lambda n: worker_identity(n).public, print)
    assert trust.admit_all(["w0", "w1"]) == ["w0", "w1"]
    most = {"w0": kept, "w1": 96}
    for worker in most:
        submit_update(s, a, worker, _update(1.0), samples=most[worker] + 1)
    ledger = RoundLedger(s, 1, a, planner.bound, FedAvg(), trust, sealed=True)
    assert ledger.scan() == []
    for worker in most:
        assert ledger.rejected[worker].reason == "bad_samples", worker
        assert ledger.rejected[worker].detail == f"samples={most[worker] + 1}, but {planner.bound(a, worker).of}"
        submit_update(s, a, worker, _update(1.0), samples=most[worker])
    again = RoundLedger(s, 1, a, planner.bound, FedAvg(), trust, sealed=True)
    assert sorted(c.worker for c in again.scan()) == ["w0", "w1"]
