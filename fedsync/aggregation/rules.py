"""Aggregation rules: how much each accepted update counts, one class per rule behind a narrow interface.

The coordinator streams updates into a weighted sum (fedavg.WeightedSum); a rule says each update's stream
weight from its samples and local steps, and by how much the parameters' mean is scaled at the end.

- FedAvg (McMahan et al. 2017): weight = samples; scale 1. With `balance: throughput` workers take different
  numbers of steps, and `samples` counts the distinct examples each actually trained on.
- FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
  Optimization", arXiv:2007.07481): with unequal local steps plain FedAvg drifts towards the objective of the
  workers that took more steps. FedNova divides each delta by its normalised step count a_i and scales the
  mean by tau_eff = sum p_i a_i. For SGD with momentum rho, a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) /
  (1 - rho). With stream weights w_i = q_i / a_i (q_i: samples, staleness-reduced when late) the streamed mean
  sum w_i d_i / sum w_i needs the scale (sum w_i a_i^2)(sum w_i) / (sum w_i a_i)^2, computed from (w_i, tau_i).

Only parameters are scaled; buffers (BatchNorm statistics) take the weighted mean, which stays a valid
statistic.
"""

from __future__ import annotations

from typing import Protocol

Part = tuple[float, int]  # (stream weight, local steps) of one accepted update


class Rule(Protocol):
    name: str

    def weight(self, samples: float, steps: int) -> float: ...

    def scale(self, parts: list[Part]) -> float: ...


class FedAvg:
    name = "fedavg"

    def weight(self, samples: float, steps: int) -> float:
        return samples

    def scale(self, parts: list[Part]) -> float:
        return 1.0


class FedNova:
    name = "fednova"

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum

    def norm(self, steps: int) -> float:
        """a_i: the L1 norm of the local solver's coefficient vector (momentum SGD), tau for plain SGD."""
        rho = self.momentum
        if rho == 0:
            return float(steps)
        return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)

    def weight(self, samples: float, steps: int) -> float:
        return samples / self.norm(steps)

    def scale(self, parts: list[Part]) -> float:
        a = [self.norm(s) for _, s in parts]
        w = [x for x, _ in parts]
        return sum(wi * ai * ai for wi, ai in zip(w, a)) * sum(w) / sum(wi * ai for wi, ai in zip(w, a)) ** 2


RULES = ("fedavg", "fednova")


def make_rule(name: str, momentum: float) -> Rule:
    return FedNova(momentum) if name == "fednova" else FedAvg()
