"""The demo's wall time and accuracy (a coordinator and 3 worker processes, 20 rounds of digits) beside the
same FedAvg written as one in-process torch loop, measured in the same run.
Usage: python benchmarks/demo_time.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time

import torch

from fedsync.aggregation.sums import WeightedSum
from fedsync.fedavg import apply_mean, delta
from fedsync.learning.data import load_digits
from fedsync.learning.models import build_model
from fedsync.learning.partition import partition
from fedsync.learning.train import TrainSettings, evaluate, local_train
from fedsync.run.config import load_config
from fedsync.tensors.files import layout_of

ROUNDS, WORKERS = 20, 3


def in_process_fedavg() -> tuple[float, float]:
    """The same rounds without files or processes: the floor for what a file protocol adds."""
    t = time.perf_counter()
    cfg = load_config("digits")
    ds = load_digits(cfg.seed, cfg.test_fraction)
    model = build_model(cfg.model, 10, seed=cfg.seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shards = partition(ds.train.y.numpy(), WORKERS, cfg.partition, cfg.seed, cfg.dirichlet_alpha)
    settings = TrainSettings(cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, augment=None)
    for r in range(1, ROUNDS + 1):
        summed = WeightedSum(layout_of(state))
        for i, idx in enumerate(shards):
            model.load_state_dict(state)
            result = local_train(model, ds.train.subset(idx), settings, "cpu", seed=r * 100 + i)
            summed.add(delta(model.state_dict(), state), float(result.samples))
        state = apply_mean(state, summed)
    model.load_state_dict(state)
    _, acc = evaluate(model, ds.test, 1024)
    return time.perf_counter() - t, acc


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "fedsync", "demo", "--share", tmp, "--rounds", str(ROUNDS),
                              "--workers", str(WORKERS)], capture_output=True, text=True, timeout=900)
        total = time.perf_counter() - t
    m = re.search(r"final test accuracy ([\d.]+), run wall time ([\d.]+) s", out.stdout)
    if out.returncode or not m:
        sys.exit(f"demo failed:\n{out.stdout}\n{out.stderr}")
    acc, wall = float(m.group(1)), float(m.group(2))
    torch.set_num_threads(1)
    base_s, base_acc = in_process_fedavg()
    print(f"demo: {ROUNDS} rounds x {WORKERS} workers on digits: test accuracy {acc:.4f} (goal >= 0.95), run wall "
          f"time {wall:.1f} s (goal <= 15 s on a quiet machine; {total:.1f} s with the demo command's own start-up)")
    print(f"  baseline in-process FedAvg loop: {base_s:.1f} s, accuracy {base_acc:.4f} -> demo / baseline "
          f"{wall / base_s:.1f}x")


if __name__ == "__main__":
    main()
