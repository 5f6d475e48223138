import numpy as np
import pytest

from fedsync.learning.partition import dirichlet_partition, hold_out, iid_partition, label_skew, partition


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_deterministic_disjoint_and_covering(scheme: str) -> None:
    labels = _labels()
    a = partition(labels, 5, scheme, seed=3, alpha=0.5)
    b = partition(labels, 5, scheme, seed=3, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    joined = np.concatenate(a)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(len(s) > 0 for s in a)
    c = partition(labels, 5, scheme, seed=4, alpha=0.5)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_shards_are_balanced() -> None:
    sizes = [len(s) for s in iid_partition(1437, 3, seed=0)]
    assert sizes == [479, 479, 479]


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels(5000)
    iid = label_skew(labels, iid_partition(len(labels), 8, seed=0))
    mild = label_skew(labels, dirichlet_partition(labels, 8, alpha=100.0, seed=0))
    strong = label_skew(labels, dirichlet_partition(labels, 8, alpha=0.1, seed=0))
    assert iid < 0.05
    assert mild < 0.1
    assert strong > 0.5 > mild


def test_impossible_partitions_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        iid_partition(2, 3, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(_labels(), 3, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="unknown partition"):
        partition(_labels(), 3, "sorted", seed=0, alpha=1.0)


@pytest.mark.parametrize("n, fraction", [(719, 0.2), (100, 0.1), (7, 0.5), (3, 0.0), (1000, 0.57)])
def test_hold_out_takes_floor_n_f_spread_evenly_without_a_random_draw(n: int, fraction: float) -> None:
    shard = np.sort(np.random.default_rng(0).choice(10 * n, n, replace=False))
    kept, held = hold_out(shard, fraction)
    assert len(held) == int(np.floor(n * fraction))  # the rule's counts telescope to floor(n * f), in doubles
    assert sorted([*kept, *held]) == list(shard) and not set(kept) & set(held)
    positions = np.flatnonzero(np.isin(shard, held))
    assert all(np.floor((i + 1) * fraction) > np.floor(i * fraction) for i in positions)  # the documented rule
    if len(held) > 1:  # evenly spread: gaps between held-out positions differ by at most one
        gaps = np.diff(positions)
        assert gaps.max() - gaps.min() <= 1
