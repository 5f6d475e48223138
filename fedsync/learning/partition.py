"""Deterministic shards of a training set from a seed, so an assignment names a shard, not its indices.

Dirichlet label skew follows Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (arXiv:1909.06335): for each class, the shards' shares
of its examples are drawn from Dirichlet(alpha); small alpha gives shards dominated by a few classes.
"""

from __future__ import annotations

import numpy as np

MAX_DIRICHLET_DRAWS = 1000


def iid_partition(n: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into num_shards near-equal parts."""
    _check(n, num_shards)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_shards)]


def dirichlet_partition(labels: np.ndarray, num_shards: int, alpha: float, seed: int,
                        min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed shards; redrawn (deterministically) until every shard has at least min_size examples."""
    labels = np.asarray(labels)
    _check(len(labels), num_shards)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if len(labels) < num_shards * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_shards} shards of at least {min_size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for shard, piece in enumerate(np.split(idx, cuts)):
                parts[shard].append(piece)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(f"no Dirichlet({alpha}) draw in {MAX_DIRICHLET_DRAWS} gave every one of {num_shards} "
                     f"shards {min_size} examples: raise alpha or use fewer workers")


def partition(labels: np.ndarray, num_shards: int, scheme: str, seed: int, alpha: float) -> list[np.ndarray]:
    if scheme == "iid":
        return iid_partition(len(labels), num_shards, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_shards, alpha, seed)
    raise ValueError(f"unknown partition {scheme!r}: use iid or dirichlet")


def hold_out(shard: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out part) of a shard for federated evaluation: floor(len * fraction) examples spread
    evenly through it, the i-th held out when floor((i + 1) * fraction) > floor(i * fraction). No random draw: any
    implementation finds the same examples."""
    i = np.arange(len(shard))
    held = np.floor((i + 1) * fraction) > np.floor(i * fraction)
    return shard[~held], shard[held]


def label_skew(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean total-variation distance between each shard's label distribution and the whole set's (0..1)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for s in shards:
        local = np.array([(labels[s] == c).mean() for c in classes])
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))


def _check(n: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if n < num_shards:
        raise ValueError(f"{n} examples cannot be split into {num_shards} non-empty shards")
