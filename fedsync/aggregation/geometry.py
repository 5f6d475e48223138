"""Where a round's accepted updates lie relative to each other, read from the update files in aligned slices
(memory O(updates x slice x lanes), never O(updates x model)): the coordinate-wise median, each update's cosine
with it (the direction screen, fedsync/aggregation/screening.py), and the squared distances between the updates
that Krum, Multi-Krum and Bulyan score them by (fedsync/aggregation/rules.py).

Every pass over the slices runs on one thread per core (fedsync/base/machine.py), each with its own interleaved
share of the slices and its own open files (torch's kernels release the GIL): a lane holds O(updates x slice), so
lanes cost no model-sized memory. What lanes accumulate is added in lane order, so a pass gives the same result
every time on one machine."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

import torch

from fedsync.aggregation.networks import order_rows
from fedsync.base.machine import cores

SLICE = 1 << 16  # elements per tensor slice a reader holds for every update at once
T = TypeVar("T")
Place = tuple[str, int, int]  # a slice: (tensor, first element, elements)


class Slices(Protocol):
    """Aligned pieces of every accepted update file."""

    def count(self) -> int: ...

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        """Elements [start, start + length) of `tensor`, flattened, from every accepted update: (updates, length), a
        new tensor the caller may change."""
        ...

    def reading(self) -> AbstractContextManager[None]:
        """A pass: while it lasts, each thread that reads keeps its files open."""
        ...


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Each lane is one thread; torch's own intra-op threads on top would only oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_lanes(slices: Slices, places: list[Place], work: Callable[[list[Place]], T]) -> list[T]:
    """`work` over `places` cut into one interleaved list per core (no more lists than places), one thread each,
    the files held open for the pass; the results in lane order."""
    lanes = min(cores(), len(places))
    if lanes < 2:
        with slices.reading():
            return [work(places)]
    with slices.reading(), torch_threads(1), ThreadPoolExecutor(lanes, thread_name_prefix="slices") as pool:
        return list(pool.map(work, [places[i::lanes] for i in range(lanes)]))


def middle(values: torch.Tensor) -> torch.Tensor:
    """Per column of (n, k) values: the middle one, or the mean of the two middle ones for an even count. Scrambles
    `values` (fedsync/aggregation/networks.py)."""
    n = values.shape[0]
    rows = order_rows(values, (n // 2,) if n % 2 else (n // 2 - 1, n // 2))
    return rows[n // 2] if n % 2 else (rows[n // 2 - 1] + rows[n // 2]) / 2


SAMPLE = 1 << 21  # coordinates the direction is measured on at most: whole slices, drawn afresh each time


def places_of(tensors: Mapping[str, int]) -> list[Place]:
    """Every slice of `tensors` (name -> element count)."""
    return [(name, start, min(SLICE, numel - start)) for name, numel in tensors.items()
            for start in range(0, numel, SLICE)]


def median_cosines(slices: Slices, tensors: Mapping[str, int], sample: int = SAMPLE) -> list[float]:
    """Per update (in the slices' order), its cosine with the coordinate-wise median of all of them over `tensors`
    (name -> element count: the trained parameters); 0 for an update or a median that is all zeros. Over more than
    `sample` coordinates, on `sample` of them in whole slices drawn at random (a cosine over 2 M coordinates is
    as telling as over all, at a fraction of the sorting; an attacker cannot know which, so it cannot hide its
    flip in the others)."""
    places = places_of(tensors)
    if sum(length for *_, length in places) > sample:
        places = sorted(random.SystemRandom().sample(places, max(1, sample // SLICE)))
    n = slices.count()

    def lane(mine: list[Place]) -> tuple[torch.Tensor, torch.Tensor, float]:
        dots, own, med = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
        for name, start, length in mine:
            values = slices.read(name, start, length).double()
            m = middle(values.clone())
            dots += values @ m
            own += values.square().sum(dim=1)
            med += float(m.square().sum())
        return dots, own, med

    parts = in_lanes(slices, places, lane)
    dots, own = sum(p[0] for p in parts), sum(p[1] for p in parts)
    med = sum(p[2] for p in parts)
    return [float(d) / math.sqrt(float(o) * med) if float(o) > 0 and med > 0 else 0.0
            for d, o in zip(dots, own)]  # type: ignore[call-overload]


def distances(slices: Slices, tensors: Mapping[str, int]) -> torch.Tensor:
    """The (updates, updates) matrix of squared L2 distances over `tensors`, from inner products accumulated slice
    by slice in float64. Each slice is first centred on its coordinate-wise mean (distances do not move), so its
    float32 inner products (four times as fast as float64's, with no conversion) keep the digits the distances
    need: |a|^2 + |b|^2 - 2 a.b cancels little when a and b lie near the origin."""
    n = slices.count()

    def lane(mine: list[Place]) -> torch.Tensor:
        g = torch.zeros((n, n), dtype=torch.float64)
        for name, start, length in mine:
            values = slices.read(name, start, length).float()
            values -= values.mean(dim=0)
            g += (values @ values.t()).double()
        return g

    g = sum(in_lanes(slices, places_of(tensors), lane), torch.zeros((n, n), dtype=torch.float64))
    d = g.diag()
    return (d[:, None] + d[None, :] - 2 * g).clamp_(min=0)  # never below 0 by rounding
