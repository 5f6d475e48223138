"""The run's privacy budget (dp), kept in the share: every closed round's summary records what it released
(docs/PROTOCOL.md section 5.17), so a restarted coordinator adds up the same spending and never spends it twice.

Before a round opens, the budget says whether its release fits under `target_epsilon` at the sampling rate it will
have (workers assigned / workers enrolled); a round that would cross it is not opened and the run ends there.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsync.aggregation.privacy.accounting import Release, epsilon
from fedsync.aggregation.privacy.noise import count_stddev, next_clip, update_noise_multiplier
from fedsync.aggregation.privacy.settings import DPSettings
from fedsync.storage.markers import FinalMarker, PrivacyRecord, Summary
from fedsync.storage.share import Share
from fedsync.storage.signing import final_message, verify


@dataclass(frozen=True)
class RoundPrivacy:
    """Round r's mechanism, fixed when it opens: the bound, the mean's denominator, the sampling rate, the noise
    multiplier the accountant charges, and (adaptive clipping) the updates' own multiplier and the count's noise."""

    clip: float
    denominator: int
    sample_rate: float
    noise_multiplier: float
    update_multiplier: float
    count_std: float | None = None

    @property
    def central_std(self) -> float:
        """The standard deviation of the noise the coordinator adds to the round's sum (central noise)."""
        return self.update_multiplier * self.clip


class Budget:
    """What the closed rounds spent, and what the next one may."""

    def __init__(self, dp: DPSettings, clip_norm: float, summaries: list[Summary]) -> None:
        self.dp = dp
        self.clip = clip_norm  # the next round's bound: clip_norm, or where adaptive clipping took it
        self.releases: list[Release] = []
        for s in summaries:
            if s.privacy is not None:
                self._add(s.privacy)

    def _add(self, record: PrivacyRecord) -> None:
        self.releases.append(Release(record.sample_rate, record.noise_multiplier, record.releases))
        if record.next_clip is not None:
            self.clip = record.next_clip

    def spent(self) -> float:
        return epsilon(self.releases, self.dp.delta)

    def plan(self, assigned: int, enrolled: int) -> RoundPrivacy:
        z = self.dp.noise_multiplier
        q = min(1.0, assigned / max(enrolled, assigned)) if self.dp.amplification else 1.0
        if not self.dp.adaptive_clip:
            return RoundPrivacy(self.clip, assigned, q, z, z)
        count_std = count_stddev(self.dp.clip_count_stddev, assigned, z)
        return RoundPrivacy(self.clip, assigned, q, z, update_noise_multiplier(z, count_std), count_std)

    def over_target(self, plan: RoundPrivacy) -> str:
        """Why a round of this plan may not open (its release would take the run past target_epsilon), or ""."""
        target = self.dp.target_epsilon
        if target is None:
            return ""
        after = epsilon([*self.releases, Release(plan.sample_rate, plan.noise_multiplier)], self.dp.delta)
        if after <= target:
            return ""
        return (f"privacy budget: one more round would spend epsilon {after:.3f} > target_epsilon {target:g} "
                f"(spent {self.spent():.3f} at delta {self.dp.delta:g})")

    def record(self, plan: RoundPrivacy, noise_multiplier: float, releases: int,
               fraction_under: float | None = None) -> PrivacyRecord:
        """A round's record for its summary: `releases` of its sum at `noise_multiplier` (0 for a redone round; 2 when
        a model of it may have been read before a stop), the next bound from `fraction_under` (adaptive clipping),
        and the budget spent through it, which the budget counts from here on."""
        spent = epsilon([*self.releases, Release(plan.sample_rate, noise_multiplier, releases)], self.dp.delta)
        following = None if fraction_under is None else \
            round(next_clip(plan.clip, fraction_under, self.dp.target_quantile, self.dp.clip_lr), 6)
        record = PrivacyRecord(epsilon=round(spent, 6), delta=self.dp.delta, noise=self.dp.noise,
                               noise_multiplier=noise_multiplier, sample_rate=plan.sample_rate, clip=plan.clip,
                               denominator=plan.denominator, releases=releases, next_clip=following,
                               fraction_under=fraction_under)
        self._add(record)
        return record


def describe(r: int, record: PrivacyRecord) -> str:
    """A round's privacy record in one line for the log."""
    return (f"round {r}: differential privacy: epsilon {record.epsilon:.4f} spent at delta {record.delta:g} "
            f"({record.releases} release(s) of noise multiplier {record.noise_multiplier:.4g}, sampling rate "
            f"{record.sample_rate:.3g}" + (f"; next clip {record.next_clip:.4g}" if record.next_clip else "") + ")")


def ended_at_budget(share: Share, run_id: str, coordinator_key: str, closed: list[int]) -> FinalMarker | None:
    """The run's final.yaml when the run ended at its privacy budget after its last closed round (signed by its
    coordinator), read as it lies: the restarted coordinator's own lease already says it drives the run on."""
    try:
        final = share.read_record(FinalMarker, share.final_marker)
    except Exception:  # noqa: BLE001 - absent or half-synced: the run did not end at its budget
        return None
    ended = final.stopped_because is not None and bool(closed) and final.round == closed[-1]
    ours = final.run_id == run_id and verify(coordinator_key, final_message(final), final.signature)
    return final if ended and ours else None
