"""Where a round's accepted updates lie relative to each other, read from the update files in aligned slices
(memory O(updates x slice), never O(updates x model)): the coordinate-wise median, each update's cosine with it
(the direction screen, fedsync/aggregation/screening.py), and the Gram matrix of inner products that Krum,
Multi-Krum and Bulyan take their pairwise distances from (fedsync/aggregation/rules.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

SLICE = 1 << 16  # elements per tensor slice a reader holds for every update at once


class Slices(Protocol):
    """Aligned pieces of every accepted update file."""

    def count(self) -> int: ...

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        """Elements [start, start + length) of `tensor`, flattened, from every accepted update: (updates, length)."""
        ...


def sorted_columns(values: torch.Tensor) -> torch.Tensor:
    """(updates, k) values sorted along the updates: a sort along contiguous rows runs about twice as fast as
    along dim 0."""
    return values.t().contiguous().sort(dim=1).values.t()


def median(ordered: torch.Tensor) -> torch.Tensor:
    """Per column of sorted values: the middle one, or the mean of the two middle ones for an even count."""
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


SAMPLE = 1 << 21  # coordinates the direction is measured on at most: whole slices, drawn afresh each time


def _places(tensors: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """Every slice of `tensors`: (name, start, length)."""
    return [(name, start, min(SLICE, numel - start)) for name, numel in tensors.items()
            for start in range(0, numel, SLICE)]


def _pieces(slices: Slices, places: list[tuple[str, int, int]]) -> Iterator[torch.Tensor]:
    for name, start, length in places:
        yield slices.read(name, start, length).double()


def median_cosines(slices: Slices, tensors: Mapping[str, int], sample: int = SAMPLE) -> list[float]:
    """Per update (in the slices' order), its cosine with the coordinate-wise median of all of them over `tensors`
    (name -> element count: the trained parameters); 0 for an update or a median that is all zeros. Over more than
    `sample` coordinates, on `sample` of them in whole slices drawn at random (a cosine over 2 M coordinates is
    as telling as over all, at a fraction of the sorting; an attacker cannot know which, so it cannot hide its
    flip in the others)."""
    places = _places(tensors)
    if sum(length for *_, length in places) > sample:
        places = sorted(random.SystemRandom().sample(places, max(1, sample // SLICE)))
    n = slices.count()
    dots, own, med = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
    for values in _pieces(slices, places):
        m = median(sorted_columns(values))
        dots += values @ m
        own += values.square().sum(dim=1)
        med += float(m.square().sum())
    return [float(d) / math.sqrt(float(o) * med) if float(o) > 0 and med > 0 else 0.0 for d, o in zip(dots, own)]


def gram(slices: Slices, tensors: Mapping[str, int]) -> torch.Tensor:
    """The (updates, updates) matrix of inner products over `tensors`, accumulated slice by slice in float64."""
    n = slices.count()
    g = torch.zeros((n, n), dtype=torch.float64)
    for values in _pieces(slices, _places(tensors)):
        g += values @ values.t()
    return g


def squared_distances(g: torch.Tensor) -> torch.Tensor:
    """Pairwise squared L2 distances from a Gram matrix: |a|^2 + |b|^2 - 2 a.b (never below 0 by rounding)."""
    d = g.diag()
    return (d[:, None] + d[None, :] - 2 * g).clamp_(min=0)
