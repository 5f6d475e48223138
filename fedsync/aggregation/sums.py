"""The running sums a round's updates are streamed into: one sum per tensor of weight x update, plus the sum of
the weights. Updates are added one at a time, or piece by piece as they are read, so memory does not grow with the
number of workers; several sums (one per reading lane) merge into one exactly. What a rule makes of them is
fedsync/fedavg.py (the weighted mean) and fedsync/aggregation/rules.py."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsync.tensors.files import Layout


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
