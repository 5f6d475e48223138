"""Order statistics of every column at once, by a comparator network (Batcher's odd-even merge sort, Knuth TAOCP
vol. 3, 5.3.4): each comparator is a vectorised minimum and maximum of two whole rows, so the work is a fixed list
of memory-speed passes over a slice, with no per-column branching. Sorting 32 values per column this way runs
10-20x faster than torch's sort along either dimension (docs/BENCHMARKS.md).

Only the comparators that an asked-for output depends on are kept: a median needs 157 of 32 values' 191, the
smallest and largest value (a trimmed mean's cut of one) 46. A comparator network only swaps values, so the rows it
was not asked for still hold the other values of their column, in some order: a trimmed mean sums them as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

Comparator = tuple[int, int]  # (i, j), i < j: afterwards row i holds the smaller value of each column


@functools.cache
def _sorting(n: int) -> tuple[Comparator, ...]:
    """Batcher's odd-even merge sort of the next power of two, less the comparators that touch a row >= n: padding
    rows of +infinity never move, so dropping them leaves a network that sorts n rows."""
    size = 1
    while size < n:
        size *= 2
    out = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        out.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(out)


@functools.cache
def network(n: int, outputs: frozenset[int]) -> tuple[Comparator, ...]:
    """The comparators of a sort of n rows that the rows `outputs` depend on, in order."""
    needed, kept = set(outputs), []
    for i, j in reversed(_sorting(n)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed.update((i, j))
    return tuple(reversed(kept))


def order_rows(values: torch.Tensor, outputs: Iterable[int]) -> list[torch.Tensor]:
    """The rows of `values` (n, k) reordered: in the list returned, row r holds each column's r-th smallest value
    for every r in `outputs`, and each column holds what it held, in some order. The rows are views of `values`,
    whose contents this scrambles, and of one spare row: a comparator writes its minimum into the spare and its
    maximum in place, then the two rows trade places in the list, two passes over memory instead of three."""
    rows = list(values.unbind(0))
    spare = torch.empty_like(rows[0]) if rows else values
    for i, j in network(len(rows), frozenset(outputs)):
        torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows
