"""The privacy budget, composed by a maintained accountant (Google's dp-accounting, its RDP accountant): each
release of a round's noised sum is the Gaussian mechanism with noise multiplier z, Poisson-subsampled at rate q
when not every enrolled worker took part. Nothing here is an accountant of our own: it only names the events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Release:
    """`count` releases of a sum with noise multiplier `noise_multiplier`, each over a sample at rate `sample_rate`."""

    sample_rate: float
    noise_multiplier: float
    count: int = 1


def _library() -> Any:
    """dp-accounting, imported when first needed: it takes 0.8 s to import, which every fedsync process would
    otherwise pay. Its RDP accountant warns (absl) for each Renyi order whose series does not converge at large
    sampling rates and leaves that order out of the minimum, which only makes epsilon larger (safe): silenced, or
    every round would print a screenful."""
    import dp_accounting
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    return dp_accounting


def event(sample_rate: float, noise_multiplier: float) -> Any:
    """The dp-accounting event of one release: the Gaussian mechanism, Poisson-subsampled when q < 1."""
    dp_event = _library().dp_event
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate >= 1 else dp_event.PoissonSampledDpEvent(sample_rate, gaussian)


def epsilon(releases: Iterable[Release], delta: float) -> float:
    """The epsilon at `delta` of all the releases composed (0 for none)."""
    grouped: Counter[tuple[float, float]] = Counter()
    for r in releases:
        grouped[(r.sample_rate, r.noise_multiplier)] += r.count
    grouped = Counter({k: n for k, n in grouped.items() if n > 0})
    if not grouped:
        return 0.0
    accountant = _library().rdp.RdpAccountant()
    for (q, z), n in sorted(grouped.items()):
        accountant.compose(event(q, z), n)
    return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, delta: float, rounds: int, sample_rate: float) -> float:
    """The smallest noise multiplier whose `rounds` releases at `sample_rate` spend at most `target_epsilon`."""

    library = _library()

    def make(z: float) -> Any:
        return library.dp_event.SelfComposedDpEvent(event(sample_rate, z), rounds)

    calibration = library.mechanism_calibration
    return float(calibration.calibrate_dp_mechanism(library.rdp.RdpAccountant, make, target_epsilon, delta,
                                                    calibration.ExplicitBracketInterval(0.05, 500.0)))
