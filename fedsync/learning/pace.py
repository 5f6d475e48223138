"""`FEDSYNC_SLOWDOWN=<factor>` makes a worker train, or a coordinator evaluate, `factor` times slower (it sleeps
after each step or batch for factor - 1 times its own time), so tests and benchmarks can run a slow machine beside
fast ones."""

from __future__ import annotations

import os
import time

import torch

SLOWDOWN_ENV = "FEDSYNC_SLOWDOWN"


class Pace:
    """Stretches each training step by FEDSYNC_SLOWDOWN; does nothing (one comparison) when it is unset."""

    def __init__(self, device: str) -> None:
        self.factor = float(os.environ.get(SLOWDOWN_ENV) or 1)
        self.device = device
        self.mark = time.perf_counter()

    def step(self) -> None:
        if self.factor <= 1:
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        time.sleep((self.factor - 1) * (time.perf_counter() - self.mark))
        self.mark = time.perf_counter()
