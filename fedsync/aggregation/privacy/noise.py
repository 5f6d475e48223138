"""The maths of the noise and the clip bound, with no I/O: Gaussian noise for a central sum, the discrete Gaussian
for integer (masked) sums, and adaptive clipping's steps (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping", Algorithm 1).

Randomness comes from generators seeded from the operating system's entropy (`secrets`), never stored: a seed in
the share would let its reader subtract the noise. The samplers work in floating point, as Opacus and TensorFlow
Federated do; floating-point side channels (Mironov 2012) are out of scope (README, "Privacy")."""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

# The integer sum of a distributed-noise round leaves room for this many standard deviations of its noise before it
# would wrap around 2^32: one coordinate of ten million passes it with probability below 1e-15.
HEADROOM_SIGMAS = 10.0


def fresh_generator() -> torch.Generator:
    """A torch generator seeded from the OS's entropy."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def fresh_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS's entropy."""
    return np.random.default_rng(secrets.randbits(128))


def add_gaussian_(tensors: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std^2) to every coordinate of every floating tensor, in place, drawn in the tensor's own precision
    (float32 sums: a quarter of float64's drawing time, benchmarks/dp_cost.py)."""
    for t in tensors.values():
        if t.is_floating_point():
            dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            t.add_(torch.empty(t.shape, dtype=dtype).normal_(0.0, std, generator=generator).to(t.dtype))


def discrete_laplace(rng: np.random.Generator, t: float, n: int) -> np.ndarray:
    """n draws of the discrete Laplace distribution with scale t: P(y) proportional to exp(-|y| / t)."""
    p = -math.expm1(-1.0 / t)
    return rng.geometric(p, n) - rng.geometric(p, n)


def discrete_gaussian(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """n draws of the discrete Gaussian N_Z(0, sigma^2), P(y) proportional to exp(-y^2 / (2 sigma^2)) on the integers:
    Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential Privacy"), Algorithm 3, rejection from
    the discrete Laplace of scale floor(sigma) + 1, vectorised."""
    if not sigma > 0:
        raise ValueError("the discrete Gaussian needs sigma > 0")
    t = math.floor(sigma) + 1.0
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        y = discrete_laplace(rng, t, todo.size)
        keep = rng.random(todo.size) < np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2 * sigma * sigma))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out


def count_stddev(setting: float | None, assigned: int, noise_multiplier: float) -> float:
    """The noise on the count of updates under the bound: the setting, else max(assigned / 20, z) (Andrew et al.
    take expected clients / 20; with few workers that would leave nothing for the updates' noise)."""
    return setting if setting is not None else max(assigned / 20, noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The updates' own noise multiplier when the count takes its part: the two Gaussian queries together are one
    of multiplier z exactly when z_updates = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al., Theorem 1; the count's
    sensitivity is 1/2)."""
    rest = noise_multiplier ** -2 - (2 * count_std) ** -2
    if not rest > 0:
        raise ValueError(f"the count's noise {count_std:g} must exceed noise_multiplier / 2 = {noise_multiplier / 2:g}")
    return rest ** -0.5


def noisy_fraction_under(norms: list[float], clip: float, denominator: int, count_std: float,
                         rng: np.random.Generator) -> float:
    """The private estimate of the fraction of updates whose norm was at most the bound: sum of (b_i - 1/2), plus
    N(0, count_std^2), over the denominator, plus 1/2."""
    centred = sum((1.0 if n <= clip else 0.0) - 0.5 for n in norms)
    return (centred + rng.normal(0.0, count_std)) / denominator + 0.5


def next_clip(clip: float, fraction_under: float, target_quantile: float, lr: float) -> float:
    """The geometric step towards the target quantile: clip x exp(-lr (fraction under - target))."""
    return clip * math.exp(-lr * (fraction_under - target_quantile))


def distributed_clip(clip: float, scale: float, dims: int) -> float:
    """The bound a worker clips to before rounding into integers, so the rounded vector's norm stays within
    scale x clip: rounding moves each of `dims` coordinates by at most 1/2 step, sqrt(dims) / 2 in all."""
    inner = clip - math.sqrt(dims) / (2 * scale)
    if not inner > 0:
        raise ValueError("the integer grid is too coarse for the clip bound")
    return inner


def worker_sigma(noise_multiplier: float, clip: float, scale: float, workers: int) -> float:
    """Each of `workers` workers' discrete Gaussian, in integer steps, so the sum carries z x clip x scale."""
    return noise_multiplier * clip * scale / math.sqrt(workers)
