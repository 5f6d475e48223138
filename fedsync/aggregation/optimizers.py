"""Server optimizers: the step that turns a round's aggregated delta into the next global model.

The delta is what workers send, averaged: (local - global), so it points the way training went; an optimizer
reads it as a negative pseudo-gradient. Plain FedAvg is the optimizer "none": server learning rate 1, no
state, next model = global + delta. An optimizer with state (momentum, second moments) keeps it in `state`,
which the coordinator saves in the share beside each round's model so that a restart continues exactly
(docs/DESIGN.md, "Aggregation"); "none" keeps none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from fedsync.base.errors import ConfigError
from fedsync.fedavg import apply_delta

PLAIN = "none"


class ServerOptimizer(Protocol):
    name: str

    def step(self, base: Mapping[str, torch.Tensor], delta: dict[str, torch.Tensor],
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global model; may consume `delta` and updates `state` in place."""
        ...


class NoOptimizer:
    name = PLAIN

    def step(self, base: Mapping[str, torch.Tensor], delta: dict[str, torch.Tensor],
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return apply_delta(base, delta)


OPTIMIZERS = (PLAIN,)


def make_optimizer(name: str) -> ServerOptimizer:
    """The server optimizer a run names; an unknown name is a config error, never a silent fallback."""
    if name == PLAIN:
        return NoOptimizer()
    raise ConfigError(f"server optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
