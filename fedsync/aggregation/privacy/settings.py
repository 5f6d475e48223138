"""What a run's `dp` and `worker_dp` keys say, and which other settings they cannot stand beside.

User-level DP-FedAvg (McMahan et al. 2018) protects each worker's whole data: every update is clipped to one L2
bound, the round's sum gets Gaussian noise of `noise_multiplier` x that bound, and the mean divides by the number of
workers assigned (a denominator fixed before any update exists). Sample-level DP-SGD on a worker (Abadi et al. 2016,
through Opacus) protects each example of that worker against everyone else, the coordinator included.
"""

from __future__ import annotations

from dataclasses import dataclass

NOISE = ("central", "distributed")


@dataclass(frozen=True)
class DPSettings:
    """The run's `dp` mapping (user-level DP-FedAvg)."""

    noise_multiplier: float          # z: the noise's standard deviation over the clip bound
    delta: float = 1e-5              # the delta epsilon is reported at; below 1 / the workers it protects
    target_epsilon: float | None = None  # a round that would spend past it is not opened; None: no limit
    amplification: bool = True       # charge a round at sampling rate assigned / enrolled, assuming whether a worker
                                     # takes part is random and independent of its data; false: rate 1 always
    noise: str = "central"           # central: the coordinator adds it; distributed: each worker adds its part
                                     # inside its masked input (secure_aggregation), so no one sees a clean sum
    adaptive_clip: bool = False      # Andrew et al. 2021: clip_norm is the first bound, then it tracks a quantile
    target_quantile: float = 0.5     # adaptive: the fraction of updates meant to fall under the bound
    clip_lr: float = 0.2             # adaptive: the bound's geometric step per round
    clip_count_stddev: float | None = None  # adaptive: noise on the count of updates under the bound;
                                            # None: max(assigned / 20, noise_multiplier)

    def problems(self) -> list[str]:
        out = []
        if not self.noise_multiplier > 0:
            out.append("dp.noise_multiplier must be positive (no noise is no differential privacy)")
        if not 0 < self.delta < 1:
            out.append("dp.delta must be between 0 and 1 (below 1 / the number of workers it protects)")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            out.append("dp.target_epsilon must be positive, or null for no limit")
        if self.noise not in NOISE:
            out.append(f"dp.noise {self.noise!r} is not one of {', '.join(NOISE)}")
        if not 0 < self.target_quantile < 1:
            out.append("dp.target_quantile must be between 0 and 1")
        if not self.clip_lr > 0:
            out.append("dp.clip_lr must be positive")
        if self.clip_count_stddev is not None and not 2 * self.clip_count_stddev > self.noise_multiplier:
            out.append(f"dp.clip_count_stddev must exceed noise_multiplier / 2 ({self.noise_multiplier / 2:g}): the "
                       "count's noise takes a part of the budget and the updates' noise the rest")
        return out


@dataclass(frozen=True)
class WorkerDPSettings:
    """The run's `worker_dp` mapping: DP-SGD on every worker (per-example clipping and noise, Opacus)."""

    noise_multiplier: float          # the noise's standard deviation over max_grad_norm, per batch
    max_grad_norm: float = 1.0       # each example's gradient is clipped to this L2 norm
    delta: float = 1e-5              # below 1 / the examples of a worker's shard

    def problems(self) -> list[str]:
        out = []
        if not self.noise_multiplier > 0:
            out.append("worker_dp.noise_multiplier must be positive")
        if not self.max_grad_norm > 0:
            out.append("worker_dp.max_grad_norm must be positive")
        if not 0 < self.delta < 1:
            out.append("worker_dp.delta must be between 0 and 1 (below 1 / a shard's examples)")
        return out
