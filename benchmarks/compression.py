"""Compressed updates: bytes moved per round and final test accuracy for none, bf16 and int8 (with and without
error feedback), digits, 3 workers, IID and Dirichlet(0.5) shards, plain FedAvg, each against `none` in the same
run. Goal (issue 17): int8 moves at most 0.27x the bytes of none and loses at most 0.5 points of accuracy.

Every round is real (benchmarks/simulate.py): the workers' deltas are encoded and written as safetensors files, the
coordinator's intake decodes them while streaming. Accuracy is the mean of SEEDS runs (different initial weights
and shards), since one run's noise is about as large as the effect measured.

Usage: python benchmarks/compression.py [ROUNDS] [SEEDS]   (default 20 rounds, 3 seeds)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/simulate.py

from benchmarks.simulate import simulate  # noqa: E402
from fedsync.run.config import load_config  # noqa: E402

SETUPS = {"none": ("none", True), "bf16": ("bf16", True), "int8": ("int8", True),
          "int8, no error feedback": ("int8", False)}


def main(rounds: int = 20, seeds: int = 3) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    print("| shards | encoding | bytes/round (3 workers) | x none | final acc (mean of seeds) | points vs none | "
          "each seed |")
    print("|---|---|---|---|---|---|---|")
    for part in ("iid", "dirichlet"):
        base_bytes = base_acc = 0.0
        for name, (encoding, feedback) in SETUPS.items():
            accs, sizes = [], []
            for seed in range(seeds):
                cfg = load_config("digits", {"partition": part, "dirichlet_alpha": 0.5, "seed": seed,
                                             "compression": encoding, "error_feedback": feedback})
                trace = simulate(cfg, "digits", 3, rounds)
                accs.append(trace.accuracy[-1])
                sizes.append(statistics.mean(trace.up_bytes))
            acc, size = statistics.mean(accs), statistics.mean(sizes)
            if name == "none":
                base_bytes, base_acc = size, acc
            print(f"| {part} | {name} | {size:,.0f} | {size / base_bytes:.3f} | {acc:.4f} | "
                  f"{100 * (acc - base_acc):+.2f} | {' '.join(f'{a:.4f}' for a in accs)} |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
