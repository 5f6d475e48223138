"""The screens a round's updates pass, in the order the coordinator applies them (docs/PROTOCOL.md section 6):
on arrival, by norm (screening.outliers) and clip_norm; at the close, by direction (screening.off_direction) and
clipping to clip_factor x the round's median norm; after the rule, the new model must be finite and valid or the
largest update is taken out. Each step acts on an Aggregator and hands back the verdicts it reached; the
coordinator's RoundIntake and benchmarks/poisoning.py run the same steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedsync.aggregation.candidates import Outcome
from fedsync.aggregation.geometry import median_cosines
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.screening import MEDIAN_FROM, off_direction, outliers
from fedsync.aggregation.validity import Validity
from fedsync.storage.reasons import Reason, Unusable


@dataclass(frozen=True)
class Screens:
    """The run's screening settings (the config keys of the same names)."""

    screen_factor: float
    screen_max_ratio: float
    clip_norm: float
    clip_factor: float
    screen_direction: bool


def on_arrival(agg: Aggregator, screens: Screens, model_norm: float) -> list[Outcome]:
    """Reject updates far over the round's median norm or the model's own (judged again as more arrive: the median
    moves), then clip the rest to clip_norm."""
    found = outliers(agg.norms, model_norm, screens.screen_factor, screens.screen_max_ratio)
    outcomes = agg.drop({c: Unusable(Reason.NORM_OUTLIER, why) for c, why in found.items()}) if found else []
    if screens.clip_norm > 0:
        outcomes += agg.clip(screens.clip_norm)
    return outcomes


def at_close(agg: Aggregator, screens: Screens, trained: Mapping[str, int]) -> tuple[list[Outcome], bool]:
    """Reject the updates pointing away from the coordinate-wise median of the accepted ones (3 or more; `trained`:
    the trained parameters' element counts) and say so (True: judge the closing rules again without them); else
    clip each update over clip_factor x the round's median norm down to it. First, an update whose file changed
    since it was read no longer counts (the screens and the rules read the files again)."""
    changed = agg.unchanged()
    if changed:
        return changed, True
    accepted = agg.accepted
    if screens.screen_direction and len(accepted) >= MEDIAN_FROM:
        found = off_direction(dict(zip(accepted, median_cosines(agg.slices(), dict(trained)))), agg.norms)
        if found:
            return agg.drop({c: Unusable(Reason.OFF_DIRECTION, why) for c, why in found.items()}), True
    norms = agg.norms
    if screens.clip_factor and len(norms) >= MEDIAN_FROM:
        return agg.clip(screens.clip_factor * statistics.median(norms.values())), False
    return [], False


def spoiled(agg: Aggregator, new_state: dict[str, torch.Tensor], validity: Validity,
            probe: Callable[[dict[str, torch.Tensor]], float] | None = None) -> tuple[list[Outcome], str]:
    """When the new model is not finite, not valid, or its loss on a few held-out examples (`probe`) is not finite:
    the largest accepted update taken out (spoils_aggregate) and why, to aggregate again without it; else nothing."""
    if not all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):
        why = "the new global model was not finite"
    elif (invalid := validity.check_state(new_state)) is not None:
        why = f"the new global model was not valid: {invalid}"
    elif probe is not None and not math.isfinite(loss := probe(new_state)):
        why = f"the new global model's loss on held-out examples was {loss}"
    else:
        return [], ""
    norms = agg.norms
    worst = max(norms, key=lambda c: norms[c])
    problem = Unusable(Reason.SPOILS_AGGREGATE, f"with it (L2 norm {norms[worst]:.4g}, the largest) {why}")
    return agg.drop({worst: problem}), f"{why}; {worst.worker}'s update taken out, aggregating again"
