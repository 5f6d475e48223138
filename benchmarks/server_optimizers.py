"""Server optimizers and presets at equal total local steps: test accuracy per round of fedavg, fedavgm, fedadam,
fedyogi, the outer Nesterov step alone, and the diloco preset, on digits and a CIFAR-10-shaped stand-in, with IID
and Dirichlet(0.5) shards; and the round at which each first reaches the fedavg run's final accuracy.

Every round is real (benchmarks/simulate.py): 3 workers train, their deltas go through the coordinator's intake,
rule and server optimizer. fedavg takes `local_epochs: 2` (30 steps a round on a digits shard) for ROUNDS rounds;
diloco takes 100 local steps a round for ROUNDS x 30 / 100 rounds: the same local steps in all, a third of the
rounds (a third of the bytes moved).

Usage: python benchmarks/server_optimizers.py [ROUNDS] [DATASET] [SETUP ...]
(default: 20 rounds, both data sets, every setup; a setup by its first word: fedavg fedavgm fedadam diloco ...)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/simulate.py

from benchmarks.simulate import DATASETS, simulate  # noqa: E402
from fedsync.run.config import load_config  # noqa: E402

WORKERS = 3
STEPS_PER_ROUND = 30  # digits, 3 IID shards of about 479 examples, batch 32, 2 epochs
SETUPS: dict[str, dict[str, object]] = {
    "fedavg": {},
    "fedavgm": {"server_optimizer": "fedavgm"},
    "fedadam": {"server_optimizer": "fedadam"},
    "fedyogi": {"server_optimizer": "fedyogi"},
    "nesterov (local epochs)": {"server_optimizer": "nesterov"},
    "diloco (100 steps)": {"preset": "diloco"},
}


def main(rounds: int = 20, datasets: tuple[str, ...] = DATASETS, only: tuple[str, ...] = ()) -> None:
    setups = {k: v for k, v in SETUPS.items() if not only or k.split()[0] in only}
    torch.set_num_threads(1)
    started = time.perf_counter()
    print("| data | shards | setup | rounds | local steps | final acc | round reaching fedavg's final "
          "| accuracy by round |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in datasets:
        for part in ("iid", "dirichlet"):
            target = None
            for name, keys in setups.items():
                n = rounds * STEPS_PER_ROUND // 100 if keys.get("preset") == "diloco" else rounds
                cfg = load_config("digits", {"partition": part, "dirichlet_alpha": 0.5, **keys})
                trace = simulate(cfg, dataset, WORKERS, n)
                target = trace.accuracy[-1] if target is None else target
                reached = trace.rounds_to(target)
                series = " ".join(f"{a:.3f}" for a in trace.accuracy)
                print(f"| {dataset} | {part} | {name} | {n} | {trace.steps} | {trace.accuracy[-1]:.4f} | "
                      f"{reached if reached is not None else 'not reached'} | {series} |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, tuple(sys.argv[2:3]) or DATASETS, tuple(sys.argv[3:]))
