"""Server optimizers: each checked against torch's own optimizer or the paper's formula written out again here, the
sign of the delta they read, buffers, purity, late updates kept out of the state, and presets."""

from __future__ import annotations

import math

import pytest
import torch

from fedsync.aggregation.optimizers import OPTIMIZERS, ServerSettings, make_optimizer
from fedsync.base.errors import ConfigError
from fedsync.run.config import load_config

PARAMS = frozenset({"w"})


def _rounds(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(5, 3, generator=g), "n": torch.tensor(float(r + 1), dtype=torch.float64)}
            for r in range(n)]


def _run(name: str, deltas: list[dict[str, torch.Tensor]], **kw: object) -> list[torch.Tensor]:
    opt = make_optimizer(ServerSettings(name, **kw), PARAMS)  # type: ignore[arg-type]
    model = {"w": torch.zeros(5, 3), "n": torch.tensor(0, dtype=torch.int64)}
    state: dict[str, torch.Tensor] = {}
    out = []
    for d in deltas:
        model, state = opt.step(model, d, state)
        out.append(model["w"].clone())
    return out


@pytest.mark.parametrize("name,momentum,nesterov", [("fedavgm", 0.9, False), ("nesterov", 0.9, True)])
def test_momentum_optimizers_are_torch_sgd_on_the_negative_delta(name: str, momentum: float, nesterov: bool) -> None:
    deltas = _rounds()
    got = _run(name, deltas, lr=0.7, momentum=momentum)
    w = torch.nn.Parameter(torch.zeros(5, 3))
    sgd = torch.optim.SGD([w], lr=0.7, momentum=momentum, nesterov=nesterov)
    for d, mine in zip(deltas, got):
        w.grad = -d["w"]  # the pseudo-gradient
        sgd.step()
        torch.testing.assert_close(mine, w.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_follow_reddi_et_al(name: str) -> None:
    deltas = _rounds()
    got = _run(name, deltas, lr=0.05, betas=(0.8, 0.95), eps=1e-3)
    x = [0.0] * 15
    m = [0.0] * 15
    v = [0.0] * 15
    for d, mine in zip(deltas, got):
        for i, di in enumerate(d["w"].reshape(-1).tolist()):
            m[i] = 0.8 * m[i] + 0.2 * di
            if name == "fedadam":
                v[i] = 0.95 * v[i] + 0.05 * di * di
            else:
                v[i] = v[i] - 0.05 * di * di * math.copysign(1.0, v[i] - di * di) * (v[i] != di * di)
            x[i] += 0.05 * m[i] / (math.sqrt(v[i]) + 1e-3)
        torch.testing.assert_close(mine.reshape(-1), torch.tensor(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_moves_the_model_the_way_the_delta_points(name: str) -> None:
    """The delta is (local - global): an update that went up must move the model up, never down."""
    up = {"w": torch.full((5, 3), 0.01), "n": torch.tensor(1.0, dtype=torch.float64)}
    for step, w in enumerate(_run(name, [up] * 3)):
        assert bool((w > 0).all()), (name, step, w)


def test_buffers_take_the_plain_mean_and_inputs_are_not_changed() -> None:
    opt = make_optimizer(ServerSettings("nesterov"), PARAMS)
    base = {"w": torch.ones(2), "bn": torch.ones(2), "n": torch.tensor(7, dtype=torch.int64)}
    delta = {"w": torch.full((2,), 0.5), "bn": torch.full((2,), 0.25), "n": torch.tensor(3.0, dtype=torch.float64)}
    state = {"m/w": torch.full((2,), 1.0)}
    copies = [{k: v.clone() for k, v in t.items()} for t in (base, delta, state)]
    model, new_state = opt.step(base, delta, state)
    torch.testing.assert_close(model["bn"], torch.full((2,), 1.25))
    assert model["n"].dtype == torch.int64 and int(model["n"]) == 10
    # m' = 0.9 * 1 + 0.5 = 1.4; x' = 1 + 0.7 * (0.5 + 0.9 * 1.4) = 2.232
    torch.testing.assert_close(new_state["m/w"], torch.full((2,), 1.4))
    torch.testing.assert_close(model["w"], torch.full((2,), 2.232))
    for before, now in zip(copies, (base, delta, state)):
        for k in before:
            assert torch.equal(before[k], now[k]), k
    assert set(new_state) == {"m/w"}  # buffers keep no state


@pytest.mark.parametrize("name", ["fedavgm", "nesterov", "fedadam", "fedyogi"])
def test_late_updates_move_the_model_once_and_never_enter_the_state(name: str) -> None:
    opt = make_optimizer(ServerSettings(name), PARAMS)
    base = {"w": torch.zeros(4)}
    state = {"m/w": torch.full((4,), 0.2)}
    if name in ("fedadam", "fedyogi"):
        state["v/w"] = torch.full((4,), 0.04)
    on_time = {"w": torch.tensor([0.1, -0.1, 0.3, 0.0])}
    with_late = {"w": torch.tensor([0.2, -0.3, 0.1, 0.5])}  # the round's aggregate with a late update folded in
    model, kept = opt.step(base, with_late, state, on_time)
    full_model, full_state = opt.step(base, with_late, state)
    _, on_time_state = opt.step(base, on_time, state)
    torch.testing.assert_close(model["w"], full_model["w"])  # the step uses everything
    for k in kept:
        torch.testing.assert_close(kept[k], on_time_state[k])  # the state only what came on time
        assert not torch.equal(kept[k], full_state[k])


def test_settings_the_optimizer_does_not_read_are_errors_not_ignored() -> None:
    with pytest.raises(ConfigError, match="server_momentum does not apply to server_optimizer fedadam"):
        make_optimizer(ServerSettings("fedadam", momentum=0.9), PARAMS)
    with pytest.raises(ConfigError, match="server_betas does not apply"):
        make_optimizer(ServerSettings("nesterov", betas=(0.9, 0.99)), PARAMS)
    with pytest.raises(ConfigError, match="server_momentum must be at least 0 and below 1"):
        make_optimizer(ServerSettings("fedavgm", momentum=1.0), PARAMS)
    with pytest.raises(ConfigError, match="server_optimizer 'adam' is not one of none, fedavgm"):
        load_config("digits", {"server_optimizer": "adam"})
    assert make_optimizer(ServerSettings("none", lr=0.5), PARAMS).step(
        {"w": torch.ones(1)}, {"w": torch.ones(1)}, {})[0]["w"].item() == 1.5  # FedAvg with a server lr


def test_presets_name_a_recipe_and_what_the_user_sets_wins() -> None:
    diloco = load_config("digits", {"preset": "diloco"})
    assert (diloco.server_optimizer, diloco.server_lr, diloco.server_momentum, diloco.local_steps) == \
        ("nesterov", 0.7, 0.9, 100)
    mine = load_config("digits", {"preset": "diloco", "local_steps": 20, "server_lr": 0.5})
    assert (mine.local_steps, mine.server_lr, mine.server_optimizer) == (20, 0.5, "nesterov")
    fedsgd = load_config("digits", {"preset": "fedsgd"})
    assert (fedsgd.local_steps, fedsgd.server_optimizer) == (1, "none")
    assert load_config("digits").preset == "fedavg" and load_config("digits").local_steps is None
    with pytest.raises(ConfigError, match="preset 'localsgd' is not one of fedavg, fedsgd, diloco"):
        load_config("digits", {"preset": "localsgd"})
