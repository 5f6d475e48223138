"""An update that arrives after its round closed: recorded as late in the next summary, then dropped or
folded into that round's aggregate with its staleness weight; two and more rounds late; past max_staleness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsync.aggregation.rules import FedAvg
from fedsync.fedavg import staleness_weight
from fedsync.learning.models import build_model
from fedsync.run.config import load_config
from fedsync.run.coordinating.ledger import Bound, LateLedger
from fedsync.run.start import open_run
from fedsync.run.trust import Trust
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Accepted,
    Assignment,
    FileRef,
    Summary,
    UpdateMarker,
    WorkerTask,
    parse,
    to_dict,
)
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified, save_state

from .helpers import (
    coordinator_identity,
    finish,
    killed_on_error,
    opened_update,
    register_worker,
    start,
    submit_update,
    wait_until,
    worker_identity,
    write_yaml,
)


def _random_delta(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(v.shape) * 1e-2).to(v.dtype) if v.is_floating_point() else torch.zeros_like(v)
            for k, v in base.items()}


def _round(s: Share, r: int) -> tuple[Assignment, dict[str, torch.Tensor]]:
    a = parse(Assignment, s.read_yaml(s.assignment(r)), f"a{r}")
    return a, load_verified(s, s.global_model(r), a.model)


def _update(s: Share, r: int, worker: str) -> tuple[int, dict[str, torch.Tensor]]:
    m = parse(UpdateMarker, s.read_yaml(s.update_marker(r, worker)), "m")
    sealed = m.encryption == "age"
    assert hash_bytes(s.store.read(s.update_tensors(r, worker, sealed), 1 << 30)) == m.tensors.blake3
    return m.samples, opened_update(s, r, worker) if sealed else load_verified(s, s.update_tensors(r, worker),
                                                                               m.tensors)


def _assert_aggregate(after: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                      parts: list[tuple[dict[str, torch.Tensor], float]]) -> None:
    """after == base + sum(w * delta) / sum(w), for the trained parameters, worked out in float64 (buffers take the
    median, tests/test_defence.py)."""
    total = sum(w for _, w in parts)
    trained = {name for name, _ in build_model("digits_cnn", 10).named_parameters()}
    for k, v in base.items():
        if k in trained:
            expected = v.double() + sum(d[k].double() * w for d, w in parts) / total
            torch.testing.assert_close(after[k].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rounds_late, exponent, expected", [
    (0, 0.5, 300.0), (1, 0.5, 300 / 2 ** 0.5), (2, 0.5, 300 / 3 ** 0.5), (3, 1.0, 75.0), (5, 0.0, 300.0)])
def test_staleness_weight(rounds_late: int, exponent: float, expected: float) -> None:
    assert staleness_weight(300, rounds_late, exponent) == pytest.approx(expected)


@pytest.mark.processes
def test_late_update_dropped(share: Path) -> None:
    """late_policy: drop records the late update in the next summary and leaves it out of the model (folding is
    checked, with its weights, by the next test)."""
    s = Share(share)
    register_worker(s, "slow")
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "min_workers=2",
                  "--set", "round_timeout=3", "--set", "late_policy=drop", "--set", "worker_timeout=60")
    fast = start("worker", "--share", str(share), "--name", "fast", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, fast):
        wait_until(lambda: s.exists(s.assignment(2)), 90, "round 1 to close at its deadline and round 2 to open")
        a1, base1 = _round(s, 1)
        submit_update(s, a1, "slow", _random_delta(base1), samples=300)
    out = finish(coord, timeout=90)
    finish(fast, timeout=30)
    assert coord.returncode == 0, out

    s1 = parse(Summary, s.read_yaml(s.summary(1)), "s1")
    assert s1.closed_because == "deadline" and s1.missing == ["slow"]
    s2 = parse(Summary, s.read_yaml(s.summary(2)), "s2")
    assert [(x.worker, x.round, x.outcome, x.weight) for x in s2.late] == [("slow", 1, "dropped", 0.0)]
    assert [x.worker for x in s2.accepted] == ["fast"]
    n2, fast_delta = _update(s, 2, "fast")
    _assert_aggregate(load_verified(s, s.final_model, s2.model), _round(s, 2)[1], [(fast_delta, n2)])


@pytest.mark.processes
def test_two_rounds_late_is_folded_by_its_age_and_past_max_staleness_is_never_read(share: Path) -> None:
    """Rounds close at their deadline (two silent workers never report). While round 3 is open, 'slow' submits
    for rounds 1 and 2 (two and one rounds late); while round 4 is open, 'stale' submits for round 1 (three
    rounds late, past max_staleness=2)."""
    s = Share(share)
    for ghost in ("slow", "stale"):
        register_worker(s, ghost)
    coord = start("coordinator", "--share", str(share), "--rounds", "4", "--set", "min_workers=3",
                  "--set", "round_timeout=5", "--set", "late_policy=fold", "--set", "max_staleness=2",
                  "--set", "worker_timeout=120", "--set", "clip_factor=0", "--set", "screen_direction=false")
    fast = start("worker", "--share", str(share), "--name", "fast", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, fast):
        wait_until(lambda: s.exists(s.assignment(3)), 90, "round 3 to open")
        late = {}
        for r, samples in ((1, 300), (2, 200)):
            a, base = _round(s, r)
            late[r] = _random_delta(base)
            submit_update(s, a, "slow", late[r], samples=samples)
        wait_until(lambda: s.exists(s.assignment(4)), 60, "round 4 to open")
        a1, base1 = _round(s, 1)
        submit_update(s, a1, "stale", _random_delta(base1), samples=300)
        out = finish(coord, timeout=90)
        finish(fast, timeout=30)
    assert coord.returncode == 0, out

    s3 = parse(Summary, s.read_yaml(s.summary(3)), "s3")
    assert [(x.worker, x.round, x.outcome) for x in s3.late] == [("slow", 1, "folded"), ("slow", 2, "folded")]
    w1, w2 = 300 / 3 ** 0.5, 200 / 2 ** 0.5  # samples x (1 + rounds late) ** -0.5
    assert [x.weight for x in s3.late] == [pytest.approx(w1, abs=1e-4), pytest.approx(w2, abs=1e-4)]
    _, base3 = _round(s, 3)
    n3, fast3 = _update(s, 3, "fast")
    _assert_aggregate(_round(s, 4)[1], base3, [(fast3, n3), (late[1], w1), (late[2], w2)])

    s4 = parse(Summary, s.read_yaml(s.summary(4)), "s4")
    assert s4.late == [] and s4.missing == ["slow", "stale"], s4
    _, base4 = _round(s, 4)
    n4, fast4 = _update(s, 4, "fast")
    _assert_aggregate(load_verified(s, s.final_model, s4.model), base4, [(fast4, n4)])


def test_late_ledger_weighs_by_age_and_looks_back_max_staleness_rounds(tmp_path: Path) -> None:
    """The ledger alone, on a share of five closed rounds in which 'late' reported nothing: its updates for
    rounds 2 to 5 turn up while round 6 is open. With max_staleness=3 the ones 1-3 rounds late are read and
    weighed by their own age; the one 4 rounds late is past the cut-off and never looked at."""
    s = Share(tmp_path)
    cfg = load_config("digits", {"late_policy": "fold", "max_staleness": 3})
    open_run(s, cfg, "coordinator", coordinator_identity())
    model = {"w": torch.zeros(3)}
    for r in range(1, 6):
        ref = save_state(s.store.write, s.global_model(r), model)
        a = Assignment(format=FORMAT_VERSION, run_id="x", round=r, rounds=9, model=ref, num_shards=2,
                       time_budget_s=5.0, workers={w: WorkerTask(shard=i, local_epochs=1)
                                                   for i, w in enumerate(("on-time", "late"))},
                       shards=FileRef("shards/002.safetensors", "cd" * 32, 10))
        write_yaml(s.path(s.assignment(r)), to_dict(a))
        write_yaml(s.path(s.summary(r)), to_dict(Summary(
            format=FORMAT_VERSION, round=r, closed_because="deadline", seconds=5.0, model=ref,
            accepted=[Accepted("on-time", 100, 3, 100.0, 0.5, 1.0, "cpu")], rejected=[], missing=["late"],
            ignored=[], late=[], aggregation="fedavg", step_scale=1.0, metrics={}, timings={})))
        submit_update(s, a, "late", {"w": torch.ones(3)}, samples=300)
    trust = Trust(s, "x", coordinator_identity(), "tofu", lambda n: worker_identity(n).public, print)
    assert trust.admit("late")  # pinned, as when the round was assigned
    ledger = LateLedger(s, 6, cfg, bounds=lambda a, w: Bound(1000, 1000, "the test's bound"), rule=FedAvg(),
                        trust=trust)
    weights = {c.round: c.weight for c in ledger.scan()}
    assert weights == {5: pytest.approx(300 / 2 ** 0.5), 4: pytest.approx(300 / 3 ** 0.5), 3: pytest.approx(150.0)}
