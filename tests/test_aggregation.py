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


def _streamed(rule: FedAvg | FedNova, base: dict[str, torch.Tensor], updates: list[tuple[dict, int, int]],
              ) -> dict[str, torch.Tensor]:
    summed = WeightedSum({k: (v.dtype, tuple(v.shape)) for k, v in base.items()})
    parts = []
    for delta, samples, steps in updates:
        w = rule.weight(samples, steps)
        summed.add(delta, w)
        parts.append((w, steps))
    result = rule.aggregate(Collected(summed, parts, frozenset({"w"}), slices=None))  # type: ignore[arg-type]
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
        weights = q / a
        direct_bn = base["bn"] + sum(wi * d["bn"] for wi, (d, _, _) in zip(weights, updates)) / weights.sum()
        got = _streamed(rule, base, updates)
        assert torch.allclose(got["w"], direct_w, atol=1e-5)
        assert torch.allclose(got["bn"], direct_bn, atol=1e-5)  # buffers: weighted mean, never scaled
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
    for name in ("fedavg", "fednova", "median", "trimmed_mean"):
        assert make_rule(name, 0.9, 0.1).name == name
    with pytest.raises(ConfigError, match="krum"):
        make_rule("krum", 0.9, 0.1)
    assert make_optimizer(ServerSettings("none"), frozenset()).name == "none"
    with pytest.raises(ConfigError, match="adamw"):
        make_optimizer(ServerSettings("adamw"), frozenset())
