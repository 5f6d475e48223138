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

Only parameters take the weighted mean; buffers (BatchNorm statistics and batch counts) take the coordinate-wise
median of the accepted updates under every rule, so that no one update can push them (with_median_buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedsync.aggregation.geometry import Place, Slices, distances, in_lanes, middle, places_of
from fedsync.aggregation.networks import order_rows
from fedsync.aggregation.sums import WeightedSum
from fedsync.base.errors import ConfigError
from fedsync.fedavg import mean_delta

Part = tuple[float, int]  # (stream weight, local steps) of one accepted update


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
        return Aggregate(with_median_buffers(collected, lambda: mean_delta(collected.sums)))


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
        mean = with_median_buffers(collected, lambda: mean_delta(collected.sums, scale, collected.parameters))
        return Aggregate(mean, scale)


def combine_slices(collected: Collected, out: dict[str, torch.Tensor],
                   combine: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each coordinate of the tensors `out` names from its values across the accepted updates (`combine`:
    (updates, k) -> k, the values in the slices' order, which it may reorder), written into `out` (integer
    tensors' rounded), on a thread per core. Memory O(updates x SLICE x cores) beyond `out`."""
    flat = {name: acc.view(-1) for name, acc in out.items()}

    def lane(mine: list[Place]) -> None:
        for name, start, k in mine:
            values = collected.slices.read(name, start, k)  # (updates, k) in the files' dtype
            if not values.is_floating_point():
                values = values.to(flat[name].dtype)  # integer buffers: combined as floats, rounded below
            flat[name][start:start + k] = combine(values)

    in_lanes(collected.slices, places_of({name: v.numel() for name, v in flat.items()}), lane)
    for name, acc in out.items():
        if name in collected.sums.integer:
            acc.round_()
    return out


def with_median_buffers(collected: Collected, mean: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A weighted-mean rule's delta whose buffers (BatchNorm statistics, batch counts) are the coordinate-wise median
    of the accepted updates' instead: one update cannot push a variance below zero or a count past 2^63 by its
    weight, and a median of valid statistics is one of them (or between two). The buffers are read from the files
    (they are small) before `mean` consumes the sums."""
    medians = combine_slices(collected, {name: torch.empty_like(acc) for name, acc in collected.sums.sums.items()
                                         if name not in collected.parameters}, middle)
    out = mean()
    out.update(medians)
    return out


class CoordinateWise:
    """Rules that combine each coordinate's values across the accepted updates (Yin et al. 2018, "Byzantine-
    Robust Distributed Learning: Towards Optimal Statistical Rates", arXiv:1803.01498): each update counts
    once, whatever its samples, so one update cannot pull a coordinate further than the others allow. They read
    aligned slices of the update files (memory O(updates x SLICE)) and write the result into the stream sum's
    buffers, which they do not otherwise use (no model-sized memory of their own)."""

    name = ""

    def weight(self, samples: float, steps: int) -> float:
        return samples  # the stream sum's weight, unused by the rule's result

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        """One slice: (updates, k) values, which it may reorder in place -> k values."""
        raise NotImplementedError

    def aggregate(self, collected: Collected) -> Aggregate:
        out = combine_slices(collected, dict(collected.sums.sums), self.combine)
        collected.sums.count = 0  # its buffers now hold the result
        return Aggregate(out)


class Median(CoordinateWise):
    name = "median"

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        return middle(values)


class TrimmedMean(CoordinateWise):
    """The mean after cutting the `trim` fraction of values at each end, and at least one (trim 0.1 of 5 updates
    would cut none and be FedAvg: one attacker of five went through), as long as one value stays."""

    name = "trimmed_mean"

    def __init__(self, trim: float) -> None:
        self.trim = trim

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        """The `cut` smallest and largest values of each column put at its ends (the middle rows then hold the
        rest, in some order), and the middle rows averaged."""
        n = values.shape[0]
        cut = trimmed(self.trim, n)
        rows = order_rows(values, [*range(cut), *range(n - cut, n)])
        return torch.stack(rows[cut:n - cut]).mean(dim=0)


def trimmed(trim: float, n: int) -> int:
    """Values cut at each end of n: floor(trim x n), at least one when trim > 0, at most (n - 1) // 2."""
    return min(max(int(trim * n), 1 if trim > 0 else 0), (n - 1) // 2)


def krum_scores(distances: torch.Tensor, byzantine: int, among: list[int]) -> dict[int, float]:
    """Krum's score of each update in `among`: the sum of its squared distances to its n - f - 2 nearest others
    there (n = len(among), f = byzantine)."""
    index = torch.tensor(among)
    apart = distances[index][:, index].clone()
    apart.fill_diagonal_(math.inf)  # not its own neighbour
    nearest = apart.sort(dim=1).values[:, :len(among) - byzantine - 2].sum(dim=1)
    return dict(zip(among, nearest.tolist()))


def krum_selection(distances: torch.Tensor, byzantine: int, keep: int) -> list[int]:
    """Bulyan's selection: `keep` updates picked one after another, each Krum's choice (the lowest score, the lower
    index on a tie) among those not picked yet."""
    left, chosen = list(range(distances.shape[0])), []
    while len(chosen) < keep:
        scores = krum_scores(distances, byzantine, left)
        best = min(left, key=lambda i: (scores[i], i))
        chosen.append(best)
        left.remove(best)
    return chosen


class Krum:
    """Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent"): score each update by the squared distances to its n - f - 2 nearest others and keep the `keep`
    lowest-scored (Krum: one; Multi-Krum: n - f), averaged with their sample weights. Distances are over the
    trained parameters (fedsync/aggregation/geometry.py). Needs n >= 2f + 3."""

    def __init__(self, byzantine: int, multi: bool) -> None:
        self.byzantine, self.multi = byzantine, multi
        self.name = "multi_krum" if multi else "krum"

    def weight(self, samples: float, steps: int) -> float:
        return samples

    def aggregate(self, collected: Collected) -> Aggregate:
        n, f = collected.slices.count(), self.byzantine
        _require(self.name, f, n)
        scores = krum_scores(distances(collected.slices, trained_sizes(collected)), f, list(range(n)))
        keep = sorted(range(n), key=lambda i: (scores[i], i))[:n - f if self.multi else 1]
        weights = torch.zeros(n, dtype=torch.float64)
        for i in keep:
            weights[i] = collected.parts[i][0]
        weights /= weights.sum()

        def mean(values: torch.Tensor) -> torch.Tensor:
            return weights.to(values.dtype) @ values
        return Aggregate(_parameters_by(collected, mean))


class Bulyan:
    """Bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium"): Krum picks
    theta = n - 2f updates one after another; per coordinate, the beta = theta - 2f of their values closest to
    their median are averaged. Needs n >= 4f + 3."""

    name = "bulyan"

    def __init__(self, byzantine: int) -> None:
        self.byzantine = byzantine

    def weight(self, samples: float, steps: int) -> float:
        return samples  # the stream sum's weight, unused by the rule's result

    def aggregate(self, collected: Collected) -> Aggregate:
        n, f = collected.slices.count(), self.byzantine
        _require(self.name, f, n)
        apart = distances(collected.slices, trained_sizes(collected))
        chosen = torch.tensor(sorted(krum_selection(apart, f, n - 2 * f)))
        beta = n - 4 * f
        return Aggregate(_parameters_by(collected, lambda values: closest_to_median(values[chosen], beta)))


def closest_to_median(picked: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column of (theta, k) values, the mean of the `beta` closest to their median. Sorted, they are a window
    of `beta` consecutive values that holds the value nearest the median (the middle one, or one of the two
    middle ones): the window whose farther end lies nearest the median (the lowest on a tie). Only the rows such
    windows span are ordered, and the window's values are gathered and summed, never taken as a difference of
    running sums, which an outlier's size would swamp."""
    theta = picked.shape[0]
    c = theta // 2
    lowest, highest = max(0, c - beta + theta % 2), min(c, theta - beta)  # where such a window may start
    s = order_rows(picked, range(lowest, highest + beta))
    m = s[c] if theta % 2 else (s[c - 1] + s[c]) / 2

    def window(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """How far its farther end lies from the median, and its sum."""
        return torch.maximum(m - s[start], s[start + beta - 1] - m), torch.stack(s[start:start + beta]).sum(dim=0)

    best, total = window(lowest)
    for start in range(lowest + 1, highest + 1):  # a few windows; each column keeps its nearest so far
        reach, values = window(start)
        nearer = reach < best
        best, total = torch.minimum(best, reach), torch.where(nearer, values, total)
    return total / beta


def trained_sizes(collected: Collected) -> dict[str, int]:
    """Element counts of the floating trained parameters, the space distances are measured in."""
    return {k: v.numel() for k, v in collected.sums.sums.items()
            if k in collected.parameters and k not in collected.sums.integer}


def _parameters_by(collected: Collected, combine: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters combined slice by slice into the stream sum's buffers; buffers from the median."""
    params = {k: v for k, v in collected.sums.sums.items() if k in collected.parameters}
    out = with_median_buffers(collected, lambda: combine_slices(collected, params, combine))
    collected.sums.count = 0  # its buffers now hold the result
    return out


RULES = ("fedavg", "fednova", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")


def needed_updates(name: str, byzantine: int) -> int:
    """The fewest accepted updates a rule can aggregate: Krum and Multi-Krum 2f + 3, Bulyan 4f + 3, others 1."""
    return {"krum": 2 * byzantine + 3, "multi_krum": 2 * byzantine + 3, "bulyan": 4 * byzantine + 3}.get(name, 1)


def _require(name: str, byzantine: int, n: int) -> None:
    """ValueError when n updates are too few for the rule (the config check keeps min_updates above it)."""
    if n < needed_updates(name, byzantine):
        raise ValueError(f"{name} with byzantine {byzantine} needs at least {needed_updates(name, byzantine)} "
                         f"updates, got {n}")


def make_rule(name: str, momentum: float, trim: float, byzantine: int = 1) -> Rule:
    """The rule a config names; an unknown name is a config error, never a silent fallback."""
    if name == "fedavg":
        return FedAvg()
    if name == "fednova":
        return FedNova(momentum)
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(trim)
    if name in ("krum", "multi_krum"):
        return Krum(byzantine, multi=name == "multi_krum")
    if name == "bulyan":
        return Bulyan(byzantine)
    raise ConfigError(f"aggregation {name!r} is not one of {', '.join(RULES)}")
