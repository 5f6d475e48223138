"""What makes a model valid beyond finite values (docs/PROTOCOL.md section 8, `invalid_state`): a BatchNorm variance
never below zero, a batch count that grows by at most one per local step. A replayed or forged update can be finite
and small and still drive every variance negative (the model then predicts one class with a NaN loss), or push a
count to 2^63 - 1 so that the global count wraps. Pure checks on tensors; the intake applies them to each update
piece by piece as it reads it, and to the round's aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedsync.tensors.encoding import NONE

LOSSY_SLACK = 1 / 100  # a lossy encoding's rounding (bf16: 2^-8 relative, int8: half a step of max / 127) allowed


@dataclass(frozen=True)
class Validity:
    """The model's constrained buffers: `variances` maps each BatchNorm running variance to the global model's
    values (flattened), `counts` names the batch counters."""

    variances: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: frozenset[str] = frozenset()

    def __contains__(self, name: str) -> bool:
        return name in self.variances or name in self.counts

    def check_piece(self, name: str, offset: int, values: torch.Tensor, steps: int, encoding: str) -> str | None:
        """Why elements [offset, offset + len) of an update's tensor `name` cannot come from honest training, or
        None: global + delta is the worker's own model, whose variances are >= 0 (less a lossy encoding's rounding)
        and whose count grew by 0..steps."""
        if name in self.counts:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > steps:
                return f"{name} grew by {low if low < 0 else high} in {steps} local step(s) (0 to {steps} expected)"
            return None
        implied = self.variances[name][offset:offset + values.numel()] + values.double()
        slack = 0.0 if encoding == NONE else LOSSY_SLACK * float(values.abs().max())
        lowest = float(implied.min())
        if lowest < -slack:
            return f"{name} would make a BatchNorm variance negative ({lowest:.4g}) in the worker's own model"
        return None

    def check_state(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why a whole model (the round's aggregate) is invalid, or None."""
        for name in self.variances:
            if not bool((state[name] >= 0).all()):
                return f"a BatchNorm variance in {name} is negative"
        for name in self.counts:
            if not bool((state[name] >= 0).all()):
                return f"the batch count {name} is negative"
        return None


def validity_of(buffers: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> Validity:
    """The checks for a model whose constrained buffers `buffers` names (tensor -> "variance" or "count"), the
    variances taken from the round's global model `state`."""
    return Validity({k: state[k].detach().reshape(-1).double() for k, kind in buffers.items() if kind == "variance"},
                    frozenset(k for k, kind in buffers.items() if kind == "count"))
