"""Server optimizers: the step that turns a round's aggregated delta into the next global model, one class per rule.

Sign: the delta is what workers send, averaged: (local - global), so it points the way training went; it is the
*negative* of the pseudo-gradient g = -delta that DiLoCo and Reddi et al. feed their outer optimizer. The
formulas below are written with the delta d directly, so a positive d always moves the model up:

- `none`       x' = x + lr d (lr 1: plain FedAvg)
- `fedavgm`    m' = b m + d;              x' = x + lr m'             (heavy ball: Hsu et al. 2019, arXiv:1909.06335)
- `nesterov`   m' = b m + d;              x' = x + lr (d + b m')     (torch's SGD(nesterov=True) on g = -d:
               DiLoCo's outer step, Douillard et al. 2023, arXiv:2311.08105)
- `fedadam`    m' = b1 m + (1-b1) d;      v' = b2 v + (1-b2) d^2;              x' = x + lr m' / (sqrt(v') + eps)
- `fedyogi`    m' as fedadam;             v' = v - (1-b2) d^2 sign(v - d^2);   x' as fedadam
  (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv:2003.00295, Algorithm 2, no bias correction)

Only trained parameters go through the optimizer; buffers (BatchNorm statistics, counts) take the plain mean,
x' = x + d, which keeps them valid statistics. State starts at zero and is kept as tensors named `m/<param>` and
`v/<param>` in the accumulators' dtype; the coordinator saves it in the share with each round's model so a
restart continues exactly (docs/PROTOCOL.md, section 5.12).

Late updates (docs/PROTOCOL.md, section 6 step 4): with late updates folded in, the step is computed from the whole
aggregate d, but the state carried to the next round is updated from the on-time aggregate alone: a late update
moves the model once and momentum never carries a stale direction into later rounds (the concern of Liu et al.
2024, "Asynchronous Local-SGD Training for Language Modeling", arXiv:2401.09135). Steps are pure: `step` returns
new tensors and never changes `base`, `delta` or `state`, so an aggregate found not finite can be redone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from fedsync.base.errors import ConfigError

Tensors = Mapping[str, torch.Tensor]
PLAIN = "none"


@dataclass(frozen=True)
class ServerSettings:
    """A run's server optimizer and its hyperparameters; None takes the optimizer's default (DEFAULTS)."""

    name: str = PLAIN
    lr: float | None = None
    momentum: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None

    def resolved(self) -> ServerSettings:
        """These settings with every unset hyperparameter at its optimizer's default (a known optimizer only)."""
        _, lr, momentum = DEFAULTS[self.name]
        return replace(self, lr=self.lr if self.lr is not None else lr,
                       momentum=self.momentum if self.momentum is not None else momentum,
                       betas=tuple(self.betas) if self.betas is not None else ADAPTIVE_BETAS,  # type: ignore[arg-type]
                       eps=self.eps if self.eps is not None else ADAPTIVE_EPS)


# name -> (what it reads besides lr, default lr, default momentum); the adaptive ones default to betas (0.9, 0.99)
# and eps 1e-3 (Reddi et al.'s tau). DiLoCo's outer step is nesterov with lr 0.7 and momentum 0.9.
DEFAULTS: dict[str, tuple[tuple[str, ...], float, float | None]] = {
    "none": ((), 1.0, None),
    "fedavgm": (("momentum",), 1.0, 0.9),
    "nesterov": (("momentum",), 0.7, 0.9),
    "fedadam": (("betas", "eps"), 0.01, None),
    "fedyogi": (("betas", "eps"), 0.01, None),
}
OPTIMIZERS = tuple(DEFAULTS)
ADAPTIVE_BETAS = (0.9, 0.99)
ADAPTIVE_EPS = 1e-3


class ServerOptimizer(Protocol):
    name: str
    stateful: bool  # keeps state between rounds (saved in the share)
    parameters: frozenset[str]  # the model's trained tensors; the others are buffers, which take the plain mean

    def step(self, base: Tensors, delta: Tensors, state: Tensors,
             on_time: Tensors | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(next global model, next state) from the round's aggregate `delta`; `on_time`, when late updates were
        folded in, is the aggregate of the on-time updates alone, which the state is updated from."""
        ...


class _Optimizer:
    """Buffers take the plain mean; each parameter goes through `_parameter`."""

    name = ""
    stateful = True

    def __init__(self, parameters: frozenset[str], lr: float) -> None:
        self.parameters, self.lr = parameters, lr

    def step(self, base: Tensors, delta: Tensors, state: Tensors,
             on_time: Tensors | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model: dict[str, torch.Tensor] = {}
        new_state: dict[str, torch.Tensor] = {}
        for name, x in base.items():
            d = delta[name]
            if name not in self.parameters or not x.is_floating_point():
                model[name] = (x.to(d.dtype) + d).to(x.dtype)
                continue
            d_on = on_time[name] if on_time is not None else d
            change = self._parameter(name, d, d_on, state, new_state)
            model[name] = (x.to(d.dtype) + change).to(x.dtype)
        return model, new_state

    def _parameter(self, name: str, d: torch.Tensor, d_on: torch.Tensor, state: Tensors,
                   new_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The change to one parameter; writes its next state into new_state."""
        raise NotImplementedError

    @staticmethod
    def _held(state: Tensors, key: str, like: torch.Tensor) -> torch.Tensor:
        held = state.get(key)
        return held.to(like.dtype) if held is not None else torch.zeros_like(like)


class Plain(_Optimizer):
    name = "none"
    stateful = False

    def _parameter(self, name: str, d: torch.Tensor, d_on: torch.Tensor, state: Tensors,
                   new_state: dict[str, torch.Tensor]) -> torch.Tensor:
        return d if self.lr == 1.0 else d * self.lr


class FedAvgM(_Optimizer):
    name = "fedavgm"

    def __init__(self, parameters: frozenset[str], lr: float, momentum: float) -> None:
        super().__init__(parameters, lr)
        self.momentum = momentum

    def _parameter(self, name: str, d: torch.Tensor, d_on: torch.Tensor, state: Tensors,
                   new_state: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self._held(state, f"m/{name}", d) * self.momentum
        new_state[f"m/{name}"] = m + d_on
        return self._change(m + d, d)

    def _change(self, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return m * self.lr


class Nesterov(FedAvgM):
    name = "nesterov"

    def _change(self, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (d + m * self.momentum) * self.lr


class FedAdam(_Optimizer):
    name = "fedadam"

    def __init__(self, parameters: frozenset[str], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(parameters, lr)
        self.betas, self.eps = betas, eps

    def _parameter(self, name: str, d: torch.Tensor, d_on: torch.Tensor, state: Tensors,
                   new_state: dict[str, torch.Tensor]) -> torch.Tensor:
        b1, _ = self.betas
        m, v = self._held(state, f"m/{name}", d), self._held(state, f"v/{name}", d)
        new_state[f"m/{name}"] = m * b1 + d_on * (1 - b1)
        new_state[f"v/{name}"] = self._second(v, d_on)
        m_step = m * b1 + d * (1 - b1)
        v_step = self._second(v, d)
        return m_step.div_(v_step.sqrt_().add_(self.eps)).mul_(self.lr)

    def _second(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return v * self.betas[1] + d.square() * (1 - self.betas[1])


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d2 = d.square()
        return v - d2 * (1 - self.betas[1]) * torch.sign(v - d2)


def check_settings(s: ServerSettings) -> list[str]:
    """What is wrong with a run's server optimizer settings: an unknown name, a value out of range, or a setting the
    chosen optimizer does not read (never silently ignored)."""
    if s.name not in DEFAULTS:
        return [f"server_optimizer {s.name!r} is not one of {', '.join(OPTIMIZERS)}"]
    reads = DEFAULTS[s.name][0]
    problems = [f"server_{key} does not apply to server_optimizer {s.name} (it reads "
                f"{', '.join(f'server_{k}' for k in ('lr', *reads))})"
                for key in ("momentum", "betas", "eps") if getattr(s, key) is not None and key not in reads]
    if s.lr is not None and not s.lr > 0:
        problems.append("server_lr must be positive")
    if s.momentum is not None and not 0 <= s.momentum < 1:
        problems.append("server_momentum must be at least 0 and below 1")
    if s.betas is not None and (len(s.betas) != 2 or not all(0 <= b < 1 for b in s.betas)):
        problems.append("server_betas must be two numbers, each at least 0 and below 1")
    if s.eps is not None and not s.eps > 0:
        problems.append("server_eps must be positive")
    return problems


def make_optimizer(settings: ServerSettings, parameters: frozenset[str]) -> ServerOptimizer:
    """The server optimizer a run names, its unset hyperparameters at their defaults; an unknown name is a config
    error, never a silent fallback."""
    problems = check_settings(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    s = settings.resolved()
    lr, momentum, betas, eps = s.lr, s.momentum, s.betas, s.eps
    if settings.name == "fedavgm":
        return FedAvgM(parameters, lr, momentum or 0.0)
    if settings.name == "nesterov":
        return Nesterov(parameters, lr, momentum or 0.0)
    if settings.name in ("fedadam", "fedyogi"):
        cls = FedAdam if settings.name == "fedadam" else FedYogi
        return cls(parameters, lr, (betas[0], betas[1]), eps)
    return Plain(parameters, lr)
