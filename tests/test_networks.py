"""The robust rules' arithmetic on whole slices: comparator networks that order every column at once (a sort by
the 0-1 principle, exhaustively for small counts, and against torch's sort for every count a round may have), the
Bulyan window, and squared distances from centred float32 inner products against float64 ones."""

from __future__ import annotations

import pytest
import torch

from fedsync.aggregation.geometry import distances, middle
from fedsync.aggregation.networks import network, order_rows
from fedsync.aggregation.rules import closest_to_median

from .helpers import StackedSlices

G = torch.Generator().manual_seed(5)


@pytest.mark.parametrize("n", range(1, 13))
def test_the_network_sorts_every_column_of_zeros_and_ones(n: int) -> None:
    """The 0-1 principle (Knuth 5.3.4): a comparator network that sorts every 0-1 sequence sorts every sequence."""
    columns = torch.tensor([[(bits >> i) & 1 for bits in range(2 ** n)] for i in range(n)], dtype=torch.float32)
    assert torch.equal(torch.stack(order_rows(columns.clone(), range(n))), columns.sort(dim=0).values)


@pytest.mark.parametrize("n", [13, 16, 17, 31, 32, 33, 50, 64, 100])
def test_pruned_networks_give_the_asked_rows_and_keep_every_value(n: int) -> None:
    values = torch.randn(n, 500, generator=G)
    values[:, :50] = torch.randint(0, 3, (n, 50), generator=G).float()  # ties
    want = values.sort(dim=0).values
    for outputs in (range(n), {n // 2}, {n // 2 - 1, n // 2}, {0, 1, n - 2, n - 1}):
        got = torch.stack(order_rows(values.clone(), outputs))
        assert all(torch.equal(got[r], want[r]) for r in outputs), outputs
        assert torch.equal(got.sort(dim=0).values, want)  # a permutation of each column
    assert len(network(32, frozenset({15, 16}))) < len(network(32, frozenset(range(32))))
    expected = want[n // 2] if n % 2 else (want[n // 2 - 1] + want[n // 2]) / 2
    assert torch.equal(middle(values.clone()), expected)


def test_bulyans_window_is_the_beta_values_nearest_the_median() -> None:
    picked = torch.randn(9, 400, generator=G)
    picked[:, 0] = torch.tensor([-1e30, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1e30])  # outliers do not swamp the sum
    got = closest_to_median(picked.clone(), 5)
    for j in range(400):
        column = picked[:, j]
        med = column.median()
        want = column[(column - med).abs().argsort()[:5]].mean()
        torch.testing.assert_close(got[j], want, rtol=1e-6, atol=1e-7)
    assert float(got[0]) == pytest.approx(0.4)  # 0.2 ... 0.6 around the median 0.4


def test_distances_from_centred_float32_products_match_float64() -> None:
    far = [{"w": torch.randn(70000, generator=G) * s} for s in (1.0, 2.0, 0.5, 3.0)]
    base = torch.randn(70000, generator=G) * 100  # near each other, far from the origin: |a|^2 >> |a - b|^2
    near = [{"w": base + torch.randn(70000, generator=G) * 1e-2} for _ in range(4)]
    for updates in (far, near):
        rows = torch.stack([u["w"].double() for u in updates])
        exact = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(dim=2)
        torch.testing.assert_close(distances(StackedSlices(updates), {"w": 70000}), exact, rtol=1e-4, atol=1e-6)
