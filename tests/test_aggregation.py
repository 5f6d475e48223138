"""Aggregation rules (FedAvg, FedNova), throughput balancing and the local loop's step budget and FedProx term:
pure maths checked against direct computation."""

from __future__ import annotations

import pytest
import torch

from fedsync.aggregation.optimizers import ServerSettings, make_optimizer
from fedsync.aggregation.rules import Collected, FedAvg, FedNova, make_rule
from fedsync.aggregation.sums import WeightedSum
from fedsync.base.errors import ConfigError
from fedsync.fedavg import apply_delta
from fedsync.learning.balance import FILL, plan_steps
from fedsync.learning.data import Split
from fedsync.learning.models import build_model
from fedsync.learning.train import TrainSettings, local_train
from fedsync.run.config import load_config
from tests.helpers import StackedSlices


def _streamed(rule: FedAvg | FedNova, base: dict[str, torch.Tensor], updates: list[tuple[dict, int, int]],
              ) -> dict[str, torch.Tensor]:
    summed = WeightedSum({k: (v.dtype, tuple(v.shape)) for k, v in base.items()})
    parts = []
    for delta, samples, steps in updates:
        w = rule.weight(samples, steps)
        summed.add(delta, w)
        parts.append((w, steps))
    result = rule.aggregate(Collected(summed, parts, frozenset({"w"}), StackedSlices([d for d, _, _ in updates])))
    return apply_delta(base, result.delta)


def test_fednova_matches_its_definition_and_fedavg_when_steps_are_equal() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=gen), "bn": torch.rand(50, generator=gen)}
    updates = [({k: torch.randn(50, generator=gen) * 0.1 for k in base}, n, t)
               for n, t in ((300, 40), (120, 3), (500, 17))]
    for rho in (0.0, 0.9):
        rule = FedNova(rho)
        q = torch.tensor([float(n) for _, n, _ in updates])
        p = q / q.sum()
        a = torch.tensor([rule.norm(t) for _, _, t in updates])
        direct_w = base["w"] + (p * a).sum() * sum(pi * d["w"] / ai for pi, ai, (d, _, _) in zip(p, a, updates))
        direct_bn = base["bn"] + torch.stack([d["bn"] for d, _, _ in updates]).median(dim=0).values
        got = _streamed(rule, base, updates)
        assert torch.allclose(got["w"], direct_w, atol=1e-5)
        assert torch.allclose(got["bn"], direct_bn, atol=1e-6)  # buffers: the median, whatever the weights
    same_steps = [(d, n, 10) for d, n, _ in updates]
    nova, avg = _streamed(FedNova(0.9), base, same_steps), _streamed(FedAvg(), base, same_steps)
    assert all(torch.allclose(nova[k], avg[k], atol=1e-5) for k in base)


def test_fednova_step_norm() -> None:
    assert FedNova(0.0).norm(7) == 7.0
    assert abs(FedNova(0.9).norm(1) - 1.0) < 1e-12  # one step moves by lr * gradient, momentum or not
    assert FedNova(0.9).norm(100) > FedNova(0.9).norm(10) > FedNova(0.9).norm(2)


def test_throughput_plan_gives_equal_time_and_the_same_total_work() -> None:
    shards = {"fast": 600, "slow": 600}
    steps = plan_steps(shards, {"fast": 4000.0, "slow": 1000.0}, local_epochs=2, batch_size=32, budget_s=120)
    assert abs(steps["fast"] / steps["slow"] - 4) < 0.1
    assert abs(sum(steps.values()) * 32 - 2 * 1200) <= 2 * 32  # as much work as two passes over both shards
    capped = plan_steps(shards, {"fast": 40.0, "slow": 10.0}, local_epochs=2, batch_size=32, budget_s=10)
    assert capped == {"fast": round(40 * FILL * 10 / 32), "slow": round(10 * FILL * 10 / 32)}
    assert plan_steps({"a": 10, "b": 10}, {"a": 1e6, "b": 1.0}, 1, 32, 60)["b"] == 1  # everyone takes a step


def _digits_like(n: int = 256) -> Split:
    gen = torch.Generator().manual_seed(1)
    return Split(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def test_local_train_takes_the_step_budget_and_counts_what_it_used() -> None:
    data, model = _digits_like(), build_model("digits_cnn", 10)
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None)
    r = local_train(model, data, settings, "cpu", seed=0)
    assert (r.steps, r.samples, r.processed) == (16, 256, 512)
    r = local_train(model, data, TrainSettings(**{**settings.__dict__, "steps": 3}), "cpu", seed=0)
    assert (r.steps, r.samples, r.processed) == (3, 96, 96)
    r = local_train(model, data, TrainSettings(**{**settings.__dict__, "steps": 20}), "cpu", seed=0)
    assert (r.steps, r.samples, r.processed) == (20, 256, 640) and r.samples_per_s > 0


def test_fedprox_keeps_local_weights_near_the_global_model() -> None:
    data = _digits_like()
    settings = TrainSettings(epochs=3, batch_size=32, lr=0.05, momentum=0.0, weight_decay=0.0, augment=None)

    def drift(mu: float) -> float:
        model = build_model("digits_cnn", 10, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        local_train(model, data, TrainSettings(**{**settings.__dict__, "prox_mu": mu}), "cpu", seed=0)
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)) ** 0.5)

    assert drift(5.0) < 0.5 * drift(0.0)


def test_unknown_rules_and_optimizers_are_config_errors() -> None:
    for name in ("fedavg", "fednova", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
        assert make_rule(name, 0.9, 0.1).name == name
    with pytest.raises(ConfigError, match="geomed"):
        make_rule("geomed", 0.9, 0.1)
    assert make_optimizer(ServerSettings("none"), frozenset()).name == "none"
    with pytest.raises(ConfigError, match="adamw"):
        make_optimizer(ServerSettings("adamw"), frozenset())


def _krum_case(n: int, attackers: int) -> tuple[list[dict[str, torch.Tensor]], WeightedSum, list[tuple[float, int]]]:
    gen = torch.Generator().manual_seed(n)
    honest = torch.randn(30, generator=gen)
    rows = [honest + 0.1 * torch.randn(30, generator=gen) for _ in range(n - attackers)]
    rows += [-5 * honest + 0.1 * torch.randn(30, generator=gen) for _ in range(attackers)]
    updates = [{"w": r, "bn": torch.full((3,), float(i)), "n": torch.tensor(i)} for i, r in enumerate(rows)]
    summed = WeightedSum({"w": (torch.float32, (30,)), "bn": (torch.float32, (3,)), "n": (torch.int64, ())})
    parts = []
    for i, u in enumerate(updates):
        summed.add(u, 10.0 + i)
        parts.append((10.0 + i, 1))
    return updates, summed, parts


def _direct_scores(rows: torch.Tensor, f: int, among: list[int]) -> dict[int, float]:
    """Krum's score written out: the n - f - 2 smallest squared distances to the others, summed."""
    out = {}
    for i in among:
        distances = sorted(float((rows[i] - rows[j]).double().square().sum()) for j in among if j != i)
        out[i] = sum(distances[:len(among) - f - 2])
    return out


def test_krum_and_multi_krum_keep_the_updates_closest_to_the_others() -> None:
    updates, summed, parts = _krum_case(7, 2)
    rows = torch.stack([u["w"] for u in updates])
    scores = _direct_scores(rows, 2, list(range(7)))
    best = min(scores, key=scores.get)
    got = make_rule("krum", 0.0, 0.1, byzantine=2).aggregate(
        Collected(summed, parts, frozenset({"w"}), StackedSlices(updates))).delta
    torch.testing.assert_close(got["w"], rows[best], rtol=1e-6, atol=1e-6)
    assert float(got["n"]) == 3.0 and torch.equal(got["bn"], torch.full((3,), 3.0))  # buffers: the median
    updates, summed, parts = _krum_case(7, 2)
    kept = sorted(scores, key=scores.get)[:5]
    assert set(kept) == {0, 1, 2, 3, 4}  # the two flipped ones score worst
    want = sum(parts[i][0] * rows[i] for i in kept) / sum(parts[i][0] for i in kept)
    got = make_rule("multi_krum", 0.0, 0.1, byzantine=2).aggregate(
        Collected(summed, parts, frozenset({"w"}), StackedSlices(updates))).delta
    torch.testing.assert_close(got["w"], want, rtol=1e-5, atol=1e-6)


def test_bulyan_averages_the_values_closest_to_the_median_of_krum_s_picks() -> None:
    updates, summed, parts = _krum_case(7, 1)
    rows = torch.stack([u["w"] for u in updates])
    left, chosen = list(range(7)), []
    while len(chosen) < 5:  # theta = n - 2f, Krum again over those not picked yet
        scores = _direct_scores(rows, 1, left)
        best = min(left, key=lambda i: (scores[i], i))
        chosen.append(best)
        left.remove(best)
    assert 6 not in chosen  # the attacker
    picked = rows[sorted(chosen)]
    med = picked.median(dim=0).values  # 5 values: the middle one
    want = torch.stack([picked[(picked[:, j] - med[j]).abs().argsort()[:3], j].mean() for j in range(30)])
    got = make_rule("bulyan", 0.0, 0.1, byzantine=1).aggregate(
        Collected(summed, parts, frozenset({"w"}), StackedSlices(updates))).delta
    torch.testing.assert_close(got["w"], want, rtol=1e-5, atol=1e-6)


def test_the_distance_rules_refuse_too_few_updates_and_configs_that_cannot_have_enough() -> None:
    updates, summed, parts = _krum_case(4, 0)
    with pytest.raises(ValueError, match="needs at least 5"):
        make_rule("krum", 0.0, 0.1, byzantine=1).aggregate(
            Collected(summed, parts, frozenset({"w"}), StackedSlices(updates)))
    with pytest.raises(ConfigError, match="bulyan with byzantine 1 needs at least 7 updates a round"):
        load_config("digits", {"aggregation": "bulyan"})
    assert load_config("digits", {"aggregation": "bulyan", "min_updates": 7}).byzantine == 1
