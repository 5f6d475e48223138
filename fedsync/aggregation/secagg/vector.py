"""A model's delta as the one vector secure aggregation sums: every floating tensor, in name order, flattened,
clipped as a whole to the L2 bound, then one coordinate that carries the weight (the bound itself, so the weights'
sum comes out of the same sum). Integer tensors (BatchNorm's batch counts) are not in it: their deltas are the
workers' step counts, which their markers state in the clear."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedsync.tensors.files import Layout


def floating(layout: Layout) -> list[str]:
    """The tensors the vector holds, in its order."""
    return sorted(k for k, (dtype, _) in layout.items() if dtype.is_floating_point)


def length(layout: Layout) -> int:
    """The vector's length: the floating tensors' elements and the weight coordinate."""
    return sum(math.prod(layout[k][1]) for k in floating(layout)) + 1


def flatten(delta: Mapping[str, torch.Tensor], layout: Layout, clip: float,
            counted: bool = True) -> tuple[np.ndarray, float]:
    """The vector of `delta`, its floating part scaled down to L2 norm `clip` when it is longer, the last coordinate
    `clip` (or 0 when not `counted`: under dp the mean divides by the workers assigned, and a worker's vector stays
    within the bound); and the norm it had."""
    parts = [delta[k].detach().to(torch.float64).reshape(-1).cpu().numpy() for k in floating(layout)]
    values = np.concatenate(parts + [np.zeros(1)])
    norm = float(np.linalg.norm(values))
    if norm > clip:
        values *= clip / norm
    values[-1] = clip if counted else 0.0
    return values, norm


def unflatten(weighted_sum: np.ndarray, layout: Layout, clip: float,
              denominator: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The weighted mean of the floating tensors from the vector's weighted sum, and the weights' sum (the last
    coordinate is the weights' sum times `clip`); with a `denominator` (dp), the sum over it."""
    weights = float(weighted_sum[-1]) / clip if denominator is None else denominator
    out, at = {}, 0
    for k in floating(layout):
        dtype, shape = layout[k]
        n = math.prod(shape)
        out[k] = torch.from_numpy(weighted_sum[at:at + n] / weights).to(dtype).reshape(shape)
        at += n
    return out, weights
