"""Weighted updates as integers mod 2^32, so masks can hide them and still cancel in the sum.

A worker clips its update to L2 norm `clip` (so every coordinate lies in [-clip, clip]), multiplies it by its weight
w (its samples, at most `max_weight`) and rounds w x coordinate x scale toward zero, mod 2^32. The sum of n such
words, read as a signed 32-bit number, is the sum of the weighted coordinates x scale, exactly as long as
|sum| < 2^31; scale = (2^31 - 1) / (n x max_weight x clip + headroom) makes that so, with room for the integer
noise of distributed differential privacy (headroom: ten of its standard deviations). Toward zero, not to the
nearest: every worker at max_weight puts clip x max_weight x scale = (2^31 - 1) / n in the weight coordinate, and
n halves rounded up would carry that sum past 2^31 - 1, where it reads as negative (two workers of 32 examples
each once decoded a mean that was the true one negated). Each worker's rounding errs by less than a step, so the
decoded weighted sum errs by less than n / scale per coordinate, and the mean (divided by the sum of weights) by
that over the weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Encoding:
    """The integer encoding of one round: every worker and the coordinator derive it from the same three numbers."""

    clip: float        # the L2 bound each update is clipped to before it is encoded (clip_norm)
    max_weight: int    # the largest weight (samples) one update may carry
    workers: int       # the updates that may be summed (the round's assigned workers)
    headroom: float = 0.0  # room left in the sum for noise the workers add (dp, distributed), in update units

    def __post_init__(self) -> None:
        if not self.clip > 0 or self.max_weight < 1 or self.workers < 1:
            raise ValueError("secure aggregation needs clip > 0, max_weight >= 1 and at least one worker")
        if self.workers * self.max_weight > LIMIT:
            raise ValueError(f"{self.workers} workers x max_weight {self.max_weight} overflow 31 bits")

    @property
    def scale(self) -> float:
        return LIMIT / (self.workers * self.max_weight * self.clip + self.headroom)

    def error_bound(self) -> float:
        """The most the decoded weighted sum of any coordinate can differ from the exact one."""
        return self.workers / self.scale

    def encode(self, values: np.ndarray, weight: int) -> np.ndarray:
        """w x values (floats already clipped to `clip`) as uint32 words."""
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight {weight} is not between 1 and max_weight {self.max_weight}")
        scaled = np.trunc(np.clip(values.astype(np.float64), -self.clip, self.clip) * (weight * self.scale))
        return scaled.astype(np.int64).astype(np.uint32)

    def decode(self, words: np.ndarray) -> np.ndarray:
        """The weighted sum the summed words stand for (float64)."""
        return words.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale
