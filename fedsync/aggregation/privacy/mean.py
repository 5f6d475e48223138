"""DP-FedAvg's estimator as an aggregation rule (McMahan et al. 2018, the fixed-denominator estimator): every
accepted update weighs 1 (a worker is one user, whatever its samples), and the round's delta is the sum of the
clipped updates plus Gaussian noise, over a denominator fixed before any update existed (the workers assigned).
Dividing by the updates that happened to arrive would let one worker's presence change every coordinate by more
than its bound allows for."""

from __future__ import annotations

import torch

from fedsync.aggregation.privacy.noise import add_gaussian_
from fedsync.aggregation.rules import Aggregate, Collected


class PrivateMean:
    name = "fedavg"

    def __init__(self, std: float, denominator: int, generator: torch.Generator) -> None:
        """`std`: the noise added to each coordinate of the sum (0 when the workers added it themselves)."""
        self.std, self.denominator, self.generator = std, denominator, generator

    def weight(self, samples: float, steps: int) -> float:
        return 1.0

    def aggregate(self, collected: Collected) -> Aggregate:
        sums = collected.sums
        unbounded = sorted(set(sums.sums) - collected.parameters)
        if unbounded:  # refused at the start (fedsync/run/start.py, check_privacy): never averaged un-noised
            raise ValueError(f"differential privacy cannot average buffers {unbounded}")
        if self.std > 0:
            add_gaussian_(sums.sums, self.std, self.generator)
        for total in sums.sums.values():
            total.div_(self.denominator)
        sums.count = 0
        return Aggregate(dict(sums.sums))
