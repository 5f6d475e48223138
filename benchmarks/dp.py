"""What user-level differential privacy costs in accuracy: digits, 20 rounds, IID and Dirichlet(0.5) shards, 5 and
20 workers, test accuracy at epsilon 1, 3 and 8 (delta 1e-5) and without DP, the mean of 3 seeds. Each run is
simulated in one process from fedsync's own parts (benchmarks/simulate.py: real training, real update files, the
coordinator's intake, its clip and its central noise), every worker taking part in every round (sampling rate 1,
no amplification), the noise multiplier the smallest that spends the epsilon in 20 rounds (dp-accounting's
calibration). Two models: digits_cnn_gn (150,000 parameters, the default model with GroupNorm) and digits_linear
(650): noise grows with the square root of the parameters and shrinks with the workers.

Local training: 2 epochs of plain SGD (lr 0.05, no momentum: with momentum the noised models diverge locally).
A run whose every update in a round diverges stops there, as a coordinator does; the cell counts such runs (their
accuracy is their last model's, 0.1 before any round closed).

Usage: python benchmarks/dp.py [SEEDS] [ROUNDS]   (default 3 seeds, 20 rounds)
Prints one Markdown table (README "Privacy", docs/BENCHMARKS.md) with each cell's seconds beside it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import simulate  # noqa: E402

from fedsync.aggregation.privacy.accounting import Release, epsilon, noise_for  # noqa: E402
from fedsync.run.config import load_config  # noqa: E402

DELTA = 1e-5
EPSILONS = (None, 8.0, 3.0, 1.0)
# clip bounds near the median norm of round 1's updates (2 local epochs, lr 0.05): large enough to learn without
# DP, and what the noise is scaled to with it
MODELS = {"digits_cnn_gn": 2.0, "digits_linear": 1.0}


def accuracy(model: str, partition: str, workers: int, z: float | None, seed: int, rounds: int) -> tuple[float, bool]:
    """The last model's test accuracy, and whether the run stopped early (every update of a round diverged: a real
    coordinator stops there and signs no final model)."""
    settings = {"model": model, "partition": partition, "dirichlet_alpha": 0.5, "seed": seed, "min_workers": workers,
                "clip_norm": MODELS[model], "momentum": 0.0, "dp": {"noise_multiplier": z} if z is not None else None}
    if z is None:  # the same clip, no noise: the difference in the table is the noise alone
        settings.update(screen_factor=0, screen_max_ratio=0, clip_factor=0, screen_direction=False)
    cfg = load_config("digits", settings)
    trace = simulate(cfg, "digits", workers, rounds)
    return (trace.accuracy[-1] if trace.accuracy else 0.1), trace.stuck is not None


def main(seeds: int, rounds: int) -> None:
    noise = {eps: noise_for(eps, DELTA, rounds, 1.0) if eps else None for eps in EPSILONS}
    print("noise multipliers for", rounds, "rounds at sampling rate 1:",
          ", ".join(f"epsilon {e:g}: z {z:.3f} (spends {epsilon([Release(1.0, z, rounds)], DELTA):.3f})"
                    for e, z in noise.items() if e and z))
    heads = " | ".join(f"epsilon {e:g}" if e else "no DP" for e in EPSILONS)
    header = f"| digits model | shards | workers | {heads} |"
    rows = [header, "|" + "---|" * (3 + len(EPSILONS))]
    for model in MODELS:
        for partition in ("iid", "dirichlet"):
            for workers in (5, 20):
                cells = []
                for eps in EPSILONS:
                    started = time.perf_counter()
                    runs = [accuracy(model, partition, workers, noise[eps], seed, rounds) for seed in range(seeds)]
                    stuck = sum(s for _, s in runs)
                    mark = f", {stuck} of {seeds} stopped" if stuck else ""
                    cells.append(f"{statistics.mean(a for a, _ in runs):.3f} ({time.perf_counter() - started:.0f} s"
                                 f"{mark})")
                shards = "IID" if partition == "iid" else "Dirichlet(0.5)"
                rows.append(f"| {model} | {shards} | {workers} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 20)
