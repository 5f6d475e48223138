"""Federated averaging, streamed: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data" (arXiv:1602.05629).

Workers send deltas (local model minus the round's global model). The new global model is the old one plus
the sample-weighted mean of the accepted deltas. A WeightedSum holds one running sum per tensor and takes
updates one at a time, or piece by piece as they are read, so memory does not grow with the number of
workers; several sums (one per reading thread) merge into one exactly.

Buffers are combined on purpose, not by accident:
- floating buffers (BatchNorm running mean and variance) are averaged with the same weights as parameters;
- integer buffers (BatchNorm's num_batches_tracked) are summed in float64, averaged with the same weights
  and rounded to the nearest integer, so the count stays a count of batches seen on an average shard.

A late update (one that arrives after its round closed) may be folded into a later round's mean as if it
were a delta from that round's model, with its weight reduced by staleness_weight (FedAsync / FedBuff style).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for integers (exact counts) and float64 models; float32 for float32 and half-precision ones."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


class WeightedSum:
    """Running sum of weight * update per tensor, plus the sum of the weights."""

    def __init__(self, layout: Layout) -> None:
        self.sums = {k: torch.zeros(shape, dtype=accumulator_dtype(dt)) for k, (dt, shape) in layout.items()}
        self.flat = {k: v.view(-1) for k, v in self.sums.items()}
        self.integer = frozenset(k for k, (dt, _) in layout.items() if not dt.is_floating_point)
        self.total_weight = 0.0
        self.count = 0

    def add_piece(self, name: str, offset: int, values: torch.Tensor, weight: float) -> None:
        """Add weight * values to elements [offset, offset + len(values)) of one tensor, flattened."""
        self.flat[name][offset:offset + values.numel()].add_(values, alpha=weight)

    def add_weight(self, weight: float) -> None:
        """Count one update whose pieces were all added with this weight."""
        self.total_weight += weight
        self.count += 1

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        for name, tensor in update.items():
            self.add_piece(name, 0, tensor.reshape(-1), weight)
        self.add_weight(weight)

    def merge(self, other: WeightedSum) -> None:
        for name, s in self.sums.items():
            s.add_(other.sums[name])
        self.total_weight += other.total_weight
        self.count += other.count

    def clear(self) -> None:
        for s in self.sums.values():
            s.zero_()
        self.total_weight = 0.0
        self.count = 0


def mean_delta(summed: WeightedSum, scale: float = 1.0,
               scaled: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The weighted mean of the summed deltas (times `scale` for the tensors named in `scaled`, an aggregation
    rule's step scale), integer tensors' means rounded to whole counts; in the accumulators' dtypes.

    Consumes `summed` (its buffers are reused for the result) so the step needs no extra model-sized memory.
    """
    if summed.count == 0 or summed.total_weight <= 0:
        raise ValueError("cannot average zero updates")
    out = {}
    for name, total in summed.sums.items():
        mean = total.div_(summed.total_weight / (scale if name in scaled else 1.0))
        if name in summed.integer:
            mean.round_()
        out[name] = mean
    summed.count = 0
    return out


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + delta, cast back to each tensor's dtype; consumes `delta` (its buffers hold the sums)."""
    return {name: delta[name].add_(tensor).to(tensor.dtype) for name, tensor in base.items()}


def apply_mean(base: Mapping[str, torch.Tensor], summed: WeightedSum, scale: float = 1.0,
               scaled: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The new global model under plain FedAvg: base + the weighted mean of the deltas (see mean_delta)."""
    return apply_delta(base, mean_delta(summed, scale, scaled))


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm over a model's (or an update's) floating tensors, summed in float64."""
    return math.sqrt(sum(float(v.double().square().sum()) for v in tensors.values() if v.is_floating_point()))


def staleness_weight(samples: float, rounds_late: int, exponent: float) -> float:
    """Weight of an update folded in `rounds_late` rounds after its own: FedAsync's polynomial staleness
    function s(t) = (1 + t)^-a (Xie, Koyejo and Gupta 2019, arXiv:1903.03934) times its sample count."""
    return samples * (1.0 + rounds_late) ** -exponent


def delta(local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a worker sends: its trained model minus the round's global model, tensor by tensor."""
    return {k: (local[k].detach().cpu() - base[k]).to(base[k].dtype) for k in base}
