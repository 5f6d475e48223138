"""Federated averaging, streamed: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data" (arXiv:1602.05629).

Workers send deltas (local model minus the round's global model). The new global model is the old one plus
the sample-weighted mean of the accepted deltas, taken from the running sums the intake streams every update
into (fedsync/aggregation/sums.py), so memory does not grow with the number of workers.

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

from fedsync.aggregation.sums import WeightedSum


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
