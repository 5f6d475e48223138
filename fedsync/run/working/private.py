"""A worker's own privacy budget under worker_dp: the DP-SGD steps it took in every round of the run, read back from
its own signed markers in the share (so a restarted worker counts them all), composed with each new round's by
dp-accounting. A round counts when its update was written: a round trained but never sent released nothing."""

from __future__ import annotations

import math

from fedsync.aggregation.privacy.accounting import Release, epsilon
from fedsync.aggregation.privacy.settings import WorkerDPSettings
from fedsync.base.errors import ConfigError
from fedsync.storage.markers import UpdateMarker
from fedsync.storage.share import Share
from fedsync.storage.signing import update_message, verify


def rate(examples: int, batch_size: int) -> float:
    """DP-SGD's sampling rate: one batch of the expected size out of ceil(examples / batch_size)."""
    return 1.0 / math.ceil(examples / batch_size)


class WorkerBudget:
    def __init__(self, share: Share, run_id: str, name: str, public_key: str, settings: WorkerDPSettings,
                 batch_size: int) -> None:
        self.settings, self.batch_size = settings, batch_size
        self.releases: dict[int, Release] = {}
        for r in share.rounds():
            try:
                m = share.read_record(UpdateMarker, share.update_marker(r, name))
            except Exception:  # noqa: BLE001 - none, or not this worker's whole marker: nothing it released
                continue
            if m.tensors is not None and m.worker_epsilon is not None and verify(
                    public_key, update_message(run_id, m), m.signature):
                self.releases[r] = Release(rate(m.samples, batch_size), settings.noise_multiplier, m.steps)

    def check(self, examples: int) -> None:
        """Refuse a delta that would let one example of a shard this small leak whole."""
        if self.settings.delta >= 1 / examples:
            raise ConfigError(f"worker_dp.delta {self.settings.delta:g} is not below 1 / the {examples} examples this "
                              "worker trains on: choose a smaller delta in a new run")

    def after(self, r: int, examples: int, steps: int) -> float:
        """The worker's epsilon once round r's update (`steps` DP-SGD steps over `examples`) is released."""
        self.releases[r] = Release(rate(examples, self.batch_size), self.settings.noise_multiplier, steps)
        return round(epsilon(self.releases.values(), self.settings.delta), 6)
