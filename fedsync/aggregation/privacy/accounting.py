"""The privacy budget, composed by a maintained accountant (Google's dp-accounting, its RDP accountant): each
release of a round's noised sum is the Gaussian mechanism with noise multiplier z, Poisson-subsampled at rate q
when not every enrolled worker took part. Nothing here is an accountant of our own: it only names the events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from absl import logging as absl_logging
from dp_accounting import dp_event, mechanism_calibration, rdp

# dp-accounting logs a warning for each Renyi order whose series does not converge at large sampling rates; it then
# leaves that order out of the minimum, which only makes epsilon larger (safe). Said once in README, not per round.
absl_logging.set_verbosity(absl_logging.ERROR)


@dataclass(frozen=True)
class Release:
    """`count` releases of a sum with noise multiplier `noise_multiplier`, each over a sample at rate `sample_rate`."""

    sample_rate: float
    noise_multiplier: float
    count: int = 1


def event(sample_rate: float, noise_multiplier: float) -> dp_event.DpEvent:
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
    accountant = rdp.RdpAccountant()
    for (q, z), n in sorted(grouped.items()):
        accountant.compose(event(q, z), n)
    return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, delta: float, rounds: int, sample_rate: float) -> float:
    """The smallest noise multiplier whose `rounds` releases at `sample_rate` spend at most `target_epsilon`."""

    def make(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(event(sample_rate, z), rounds)

    return float(mechanism_calibration.calibrate_dp_mechanism(
        rdp.RdpAccountant, make, target_epsilon, delta, mechanism_calibration.ExplicitBracketInterval(0.05, 500.0)))
