"""Who shares with whom: SecAgg+'s sparse graph. Each worker splits its secrets among its k neighbours and itself
(its holders); any `threshold` of them give a secret back. k grows with log n, so a worker's cost is O(log n)
however many take part.

The graph is a Harary graph (a ring where each worker links to k/2 workers on each side) over the workers in an
order drawn from the round's public seed (the assigned model's hash): everybody derives the same graph from the
signed assignment."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


def degree(n: int) -> int:
    """k: 2 ceil(log2 n), or n - 1 (every other worker) while that is no more."""
    k = 2 * math.ceil(math.log2(n)) if n > 1 else 0
    return n - 1 if k >= n - 1 else k


@dataclass(frozen=True)
class Graph:
    neighbours: dict[str, tuple[str, ...]]  # sorted, never the worker itself

    def holders(self, worker: str) -> tuple[str, ...]:
        """Who holds a share of `worker`'s secrets: its neighbours and itself, sorted (share x = place + 1)."""
        return tuple(sorted((*self.neighbours[worker], worker)))

    def threshold(self, worker: str) -> int:
        """Shares that give `worker`'s secrets back: a majority of its holders, so a coordinator that collected
        one kind of share from a majority can never collect the other kind of the same worker too."""
        return len(self.holders(worker)) // 2 + 1

    def point(self, worker: str, holder: str) -> int:
        """The x at which `holder` holds `worker`'s share."""
        return self.holders(worker).index(holder) + 1


def build(workers: list[str], seed: str) -> Graph:
    """The round's graph over `workers` (names), ordered by SHA-256 of seed and name."""
    order = sorted(workers, key=lambda w: hashlib.sha256(f"{seed}\n{w}".encode()).digest())
    n, k = len(order), degree(len(order))
    out: dict[str, set[str]] = {w: set() for w in order}
    for i, w in enumerate(order):
        for step in range(1, k // 2 + 1):
            for j in (i - step, i + step):
                other = order[j % n]
                if other != w:
                    out[w].add(other)
                    out[other].add(w)
    if k == n - 1:  # every other worker (with n even the ring's steps would stop one short)
        out = {w: set(order) - {w} for w in order}
    return Graph({w: tuple(sorted(v)) for w, v in out.items()})
