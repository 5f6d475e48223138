"""Aggregation rules: how the accepted updates of a round become one delta, one class per rule behind a narrow
interface (docs/DESIGN.md, "Aggregation").

A rule says each update's stream weight (from its samples and local steps) while the coordinator reads the
updates, and at the close turns what was collected into the aggregated delta. Collected holds the streamed
weighted sum (memory O(model), for weighted means) and a reader of aligned slices of every accepted update
file (memory O(updates x slice), for coordinate-wise rules such as a median). A server optimizer
(fedsync/aggregation/optimizers.py) then turns the delta into the next global model.

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

from dataclasses import dataclass
from typing import Protocol

import torch

from fedsync.aggregation.sums import WeightedSum
from fedsync.base.errors import ConfigError
from fedsync.fedavg import mean_delta

Part = tuple[float, int]  # (stream weight, local steps) of one accepted update


class Slices(Protocol):
    """Aligned pieces of every accepted update file, for coordinate-wise rules."""

    def count(self) -> int: ...

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        """Elements [start, start + length) of `tensor`, flattened, from every accepted update: (updates, length)."""
        ...


@dataclass
class Collected:
    """What a round took in, for the rule to turn into one delta."""

    sums: WeightedSum          # the accepted deltas streamed into a sum with the rule's weights
    parts: list[Part]          # (stream weight, local steps) of each accepted update
    parameters: frozenset[str] # trained parameters; the other tensors are buffers (BatchNorm statistics)
    slices: Slices             # the accepted update files themselves, read in aligned slices


@dataclass
class Aggregate:
    delta: dict[str, torch.Tensor]
    step_scale: float = 1.0    # what the parameters' mean was scaled by (FedNova); 1 for rules that do not scale


class Rule(Protocol):
    name: str

    def weight(self, samples: float, steps: int) -> float: ...

    def aggregate(self, collected: Collected) -> Aggregate: ...


class FedAvg:
    name = "fedavg"

    def weight(self, samples: float, steps: int) -> float:
        return samples

    def aggregate(self, collected: Collected) -> Aggregate:
        return Aggregate(mean_delta(collected.sums))


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

    def aggregate(self, collected: Collected) -> Aggregate:
        scale = self.scale(collected.parts)
        return Aggregate(mean_delta(collected.sums, scale, collected.parameters), scale)


SLICE = 1 << 16  # elements per tensor slice a coordinate-wise rule holds for every update at once


class CoordinateWise:
    """Rules that combine each coordinate's values across the accepted updates (Yin et al. 2018, "Byzantine-
    Robust Distributed Learning: Towards Optimal Statistical Rates", arXiv:1803.01498): each update counts
    once, whatever its samples, so one update cannot pull a coordinate further than the others allow. They read
    aligned slices of the update files (memory O(updates x SLICE)) and write the result into the stream sum's
    buffers, which they do not otherwise use (no model-sized memory of their own)."""

    name = ""

    def weight(self, samples: float, steps: int) -> float:
        return samples  # the stream sum's weight, unused by the rule's result

    def combine(self, ordered: torch.Tensor) -> torch.Tensor:
        """One slice: (updates, k) values sorted along the updates -> k values."""
        raise NotImplementedError

    def aggregate(self, collected: Collected) -> Aggregate:
        out = {}
        for name, acc in collected.sums.sums.items():
            flat = acc.view(-1)
            for start in range(0, flat.numel(), SLICE):
                k = min(SLICE, flat.numel() - start)
                values = collected.slices.read(name, start, k)  # (updates, k) in the files' dtype
                if not values.is_floating_point():
                    values = values.to(flat.dtype)  # integer buffers: combined (a mean) as floats, rounded below
                # sorted along the updates: a sort along contiguous rows runs about twice as fast as along dim 0
                ordered = values.t().contiguous().sort(dim=1).values.t()
                flat[start:start + k] = self.combine(ordered)
            if name in collected.sums.integer:
                acc.round_()
            out[name] = acc
        collected.sums.count = 0  # its buffers now hold the result
        return Aggregate(out)


class Median(CoordinateWise):
    name = "median"

    def combine(self, ordered: torch.Tensor) -> torch.Tensor:
        n = ordered.shape[0]
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(CoordinateWise):
    """The mean after cutting the `trim` fraction of values at each end, and at least one (trim 0.1 of 5 updates
    would cut none and be FedAvg: one attacker of five went through), as long as one value stays."""

    name = "trimmed_mean"

    def __init__(self, trim: float) -> None:
        self.trim = trim

    def combine(self, ordered: torch.Tensor) -> torch.Tensor:
        n = ordered.shape[0]
        cut = trimmed(self.trim, n)
        return ordered[cut:n - cut].mean(dim=0)


def trimmed(trim: float, n: int) -> int:
    """Values cut at each end of n: floor(trim x n), at least one when trim > 0, at most (n - 1) // 2."""
    return min(max(int(trim * n), 1 if trim > 0 else 0), (n - 1) // 2)


RULES = ("fedavg", "fednova", "median", "trimmed_mean")


def make_rule(name: str, momentum: float, trim: float) -> Rule:
    """The rule a config names; an unknown name is a config error, never a silent fallback."""
    if name == "fedavg":
        return FedAvg()
    if name == "fednova":
        return FedNova(momentum)
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(trim)
    raise ConfigError(f"aggregation {name!r} is not one of {', '.join(RULES)}")
