"""The optimizer CPU and MPS workers train with: torch.optim.SGD's update without importing torch._dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from fedsync.learning.sgd import ForeachSGD


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)])
def test_foreach_sgd_takes_exactly_torch_sgds_steps(momentum: float, weight_decay: float) -> None:
    """The CPU workers' optimizer (fedsync/learning/sgd.py) against torch.optim.SGD on the same model and batches."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    theirs = copy.deepcopy(ours)
    a = ForeachSGD(list(ours.parameters()), 0.05, momentum, weight_decay)
    b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for _ in range(5):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)



@pytest.mark.processes
def test_training_on_the_cpu_never_imports_dynamo() -> None:
    """The reason ForeachSGD exists: a CPU worker's first round must not pay torch._dynamo's import (seconds)."""
    code = ("import sys; from fedsync.learning.train import TrainSettings, local_train; import torch; "
            "m = torch.nn.Linear(4, 2); from fedsync.learning.data import Split; "
            "d = Split(torch.randn(8, 4), torch.randint(0, 2, (8,))); "
            "local_train(m, d, TrainSettings(1, 4, 0.1, 0.9, 0.0, None), 'cpu', 0); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
