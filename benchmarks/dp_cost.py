"""What differential privacy's noise costs in time, at ResNet-18's size (11.2 M parameters), each beside the work it
sits next to, measured in the same run:

- central noise: the coordinator's Gaussian draw over the round's sum (fedsync/aggregation/privacy/noise.py,
  add_gaussian_) against adding one update into the round's sum (the intake's per-update work in memory);
- distributed noise: a worker's discrete Gaussian over its integer vector against expanding one secure-aggregation
  mask of the same length (ChaCha20, the worker's per-neighbour cost);
- the accountant: the epsilon of a 1,000-round run (dp-accounting's RDP accountant, rounds grouped by mechanism).

Usage: python benchmarks/dp_cost.py [PARAMETERS]   (default 11,173,962)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync.aggregation.privacy.accounting import Release, epsilon  # noqa: E402
from fedsync.aggregation.privacy.noise import add_gaussian_, discrete_gaussian, fresh_generator, fresh_rng  # noqa: E402
from fedsync.aggregation.secagg.masks import expand  # noqa: E402
from fedsync.aggregation.sums import WeightedSum  # noqa: E402


def best(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(n: int) -> None:
    update = {"w": torch.randn(n)}
    total = WeightedSum({"w": (torch.float32, (n,))})
    add = best(lambda: total.add(update, 1.0))
    noise = best(lambda: add_gaussian_(total.sums, 0.1, fresh_generator()))
    print(f"central noise over {n:,} parameters: {noise:.3f} s, {noise / add:.1f}x adding one update into the sum "
          f"({add:.3f} s)")
    seed = os.urandom(32)
    mask = best(lambda: expand(seed, 0, n))
    rng = fresh_rng()
    dgauss = best(lambda: discrete_gaussian(rng, 4.3e7, n))
    print(f"distributed noise (discrete Gaussian, sigma 4.3e7 steps): {dgauss:.3f} s, {dgauss / mask:.1f}x expanding "
          f"one mask ({mask:.3f} s)")
    rounds = [Release(0.5 + 0.5 * (r % 2), 1.1, 1) for r in range(1000)]
    accountant = best(lambda: epsilon(rounds, 1e-5), repeats=1)
    print(f"epsilon of 1,000 rounds (two mechanisms): {accountant:.3f} s = {epsilon(rounds, 1e-5):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 11_173_962)
