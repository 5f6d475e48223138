"""Verdicts a person can act on, from what closed rounds recorded: which workers to stop giving work (their updates
were rejected for what they held, round after round), and whether a round that cannot close failed because every
worker diverges or because updates accepted earlier ruined the model. Pure functions over summaries and
evaluations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedsync.storage.markers import Summary
from fedsync.storage.reasons import Reason

# rejections for what an update holds, not for how it travelled (unsynced, unsigned) or an honest divergence
POISON = frozenset(r.value for r in (
    Reason.BAD_SAMPLES, Reason.NOT_SAFETENSORS, Reason.MISSING_TENSOR, Reason.EXTRA_TENSOR, Reason.WRONG_SHAPE,
    Reason.WRONG_DTYPE, Reason.NON_FINITE, Reason.BAD_ENCODING, Reason.NORM_OUTLIER, Reason.INVALID_STATE,
    Reason.OFF_DIRECTION, Reason.SPOILS_AGGREGATE))
FALL = 0.2  # test accuracy this far below the run's best so far: the model was ruined, not merely noisy


def to_exclude(recent: list[Summary], after: int) -> dict[str, str]:
    """Workers whose updates were rejected for what they held in each of the `after` rounds of `recent` (the last
    closed rounds, oldest first; fewer than `after` decides nothing), each with the reasons in words."""
    if after < 1 or len(recent) < after:
        return {}
    window = recent[-after:]
    rejected = [{x.worker: x.reason for x in s.rejected if x.reason in POISON} for s in window]
    return {w: f"its updates were rejected in rounds {window[0].round}-{window[-1].round} in a row (" +
               ", ".join(sorted({r[w] for r in rejected})) + ")"
            for w in sorted(set.intersection(*(set(r) for r in rejected)))}


@dataclass(frozen=True)
class Quality:
    """A closed round's model on the held-out set, and the workers whose updates made it."""

    round: int
    accuracy: float
    loss: float
    accepted: tuple[str, ...]


def ruined(history: list[Quality]) -> str:
    """How updates accepted earlier ruined the model, or "" when they did not: the last evaluated model's test loss
    is not finite, or its accuracy fell more than FALL below the best before it. Names the rounds since the best
    and the workers accepted in them."""
    if not history:
        return ""
    last = history[-1]
    best = max(history, key=lambda q: q.accuracy if math.isfinite(q.loss) else -1.0)
    if math.isfinite(last.loss) and last.accuracy >= best.accuracy - FALL:
        return ""
    since = [q for q in history if q.round > best.round] or [last]
    workers = sorted({w for q in since for w in q.accepted})
    span = f"round {since[0].round}" if len(since) == 1 else f"rounds {since[0].round}-{since[-1].round}"
    return (f"the model was ruined by updates accepted in {span} (from {', '.join(workers)}): test accuracy "
            f"{best.accuracy:.3f} after round {best.round}, {last.accuracy:.3f} (test loss {last.loss:.4g}) after "
            f"round {last.round}")


def history(summaries: Mapping[int, Summary], evaluated: Mapping[int, tuple[float, float]]) -> list[Quality]:
    """The evaluated closed rounds in order: (accuracy, loss) from `evaluated`, the accepted workers from their
    summaries."""
    return [Quality(r, acc, loss, tuple(x.worker for x in summaries[r].accepted))
            for r, (acc, loss) in sorted(evaluated.items()) if r in summaries]
