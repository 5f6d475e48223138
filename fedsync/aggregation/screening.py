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
