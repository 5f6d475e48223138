"""Sizing each worker's work by its measured speed (`balance: throughput`): pure arithmetic, no I/O.

With equal work a round lasts as long as its slowest worker. Here every worker trains for the same time T,
taking speed_i * T examples, with T chosen so that the round does as much work in all as the equal plan
(local_epochs passes over every shard, or local_steps steps for each worker): fast machines take more steps,
slow ones fewer, none waits. T never exceeds FILL of the round's time budget, leaving the rest for syncing files
and aggregating.
"""

from __future__ import annotations

from collections.abc import Mapping

BALANCE = ("equal", "throughput")
FILL = 0.8


def plan_steps(shard_sizes: Mapping[str, int], speeds: Mapping[str, float], local_epochs: int, batch_size: int,
               budget_s: float, local_steps: int | None = None) -> dict[str, int]:
    """Optimizer steps per worker so that all finish together; every worker takes at least one step."""
    work = (local_steps * batch_size * len(shard_sizes) if local_steps is not None
            else local_epochs * sum(shard_sizes.values()))
    seconds = min(work / sum(speeds[w] for w in shard_sizes), FILL * budget_s)
    return {w: max(1, round(speeds[w] * seconds / batch_size)) for w in shard_sizes}
