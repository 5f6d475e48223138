"""Screening: an update too large to be honest is rejected before any rule sees it (docs/PROTOCOL.md section 8,
`norm_outlier`). Pure arithmetic on the L2 norms the intake measures while it reads each update.

Two bounds, both loose enough that honest updates pass (docs/BENCHMARKS.md counts them in honest runs):
- absolute: norm > `max_ratio` x the round's global model's norm (the only bound with one or two updates;
  an honest round-1 digits update measured 0.77 x the model);
- relative, with three or more updates: norm > `factor` x the median norm of the round's accepted updates
  (honest digits updates measured up to 3.8 x their round's median with Dirichlet(0.5) shards).
An update whose squares overflow (values near 1e19 and up) has an infinite norm and fails both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import TypeVar

K = TypeVar("K")
MEDIAN_FROM = 3  # updates needed before the median says anything about one of them


def outliers(norms: Mapping[K, float], model_norm: float, factor: float, max_ratio: float) -> dict[K, str]:
    """The updates to reject, each with why; `factor` or `max_ratio` 0 turns that bound off."""
    median = statistics.median(norms.values()) if len(norms) >= MEDIAN_FROM else None
    out: dict[K, str] = {}
    for key, norm in norms.items():
        if max_ratio and not norm <= max_ratio * model_norm:
            out[key] = (f"L2 norm {norm:.4g} is over {max_ratio:g} x the global model's norm {model_norm:.4g} "
                        "(screen_max_ratio)")
        elif factor and median is not None and (not math.isfinite(norm) or norm > factor * median):
            out[key] = (f"L2 norm {norm:.4g} is over {factor:g} x the median {median:.4g} of the round's "
                        f"{len(norms)} updates (screen_factor)")
    return out


SPREAD = 4.0       # median absolute deviations below the round's median cosine before an update is off direction
LEAST_SPREAD = 0.05  # the deviation never counts as smaller than this (three nearly equal cosines say little)
PUSH = 2.0         # ... and only with an L2 norm over this x the round's median: pushing harder than most


def off_direction(cosines: Mapping[K, float], norms: Mapping[K, float]) -> dict[K, str]:
    """The updates that push the model away from the round's consensus, each with why: a cosine with the
    coordinate-wise median of the accepted updates below zero *and* far below the others' (median - SPREAD x their
    median absolute deviation), *and* an L2 norm over PUSH x the round's median. A flipped update x5 lands near -0.6
    with five times a typical norm while honest ones agree (digits, round 1: +0.5 to +0.8, docs/BENCHMARKS.md). Late
    in training honest updates are mostly noise, and a worker whose data differs (Dirichlet shards) may point away
    from the others, with up to twice a typical norm (measured through real processes): such ones stay, and
    clipping (clip_factor) bounds what any update pointing away can do."""
    if len(cosines) < MEDIAN_FROM:
        return {}
    middle = statistics.median(cosines.values())
    spread = max(statistics.median(abs(c - middle) for c in cosines.values()), LEAST_SPREAD)
    limit = min(0.0, middle - SPREAD * spread)
    typical = statistics.median(norms[k] for k in cosines)
    return {key: (f"its cosine with the coordinate-wise median of the round's {len(cosines)} updates is {c:.3f}, "
                  f"below {limit:.3f} (the median cosine {middle:.3f} less {SPREAD:g} x their spread {spread:.3f}), "
                  f"with an L2 norm {norms[key]:.4g} over {PUSH:g} x the round's median {typical:.4g} "
                  "(screen_direction)")
            for key, c in cosines.items() if c < limit and norms[key] > PUSH * typical}
