"""A fresh worker process's first local training against its second, on the digits task (30 steps, batch 32, one
torch thread), with the optimizer CPU workers use (ForeachSGD) and, as the baseline, torch.optim.SGD, each in its
own new process: torch.optim imports torch._dynamo on first use, seconds a CPU worker used to pay in round 1.

Usage: python benchmarks/first_round.py
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import time, torch
torch.set_num_threads(1)
from fedsync.learning import train
from fedsync.learning.tasks import get_task
from fedsync.run.config import load_config
if {baseline}:
    train.ForeachSGD = lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                                         weight_decay=wd)
cfg = load_config("digits")
task = get_task("digits")
shard = task.load(None, cfg.data_options()).train.subset(list(range(480)))
settings = train.TrainSettings(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None)
for i in range(2):
    t = time.perf_counter()
    train.local_train(task.build_model(cfg.model), shard, settings, "cpu", seed=i)
    print(time.perf_counter() - t)
"""


def first_and_second(baseline: bool) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CODE.format(baseline=baseline)], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ours, theirs = first_and_second(False), first_and_second(True)
    print("first and second local training in a new process (digits, 30 steps):")
    print(f"  ForeachSGD (fedsync):          {ours[0]:.2f} s, then {ours[1]:.2f} s")
    print(f"  torch.optim.SGD (baseline):    {theirs[0]:.2f} s, then {theirs[1]:.2f} s")
    print(f"  first round: {theirs[0] / ours[0]:.1f}x faster; {theirs[0] - ours[0]:.2f} s saved per worker process")


if __name__ == "__main__":
    main()
