"""A worker's data: what it trains on (its shard of the shared data set, or for a private task its own examples,
registered by count and never sent), and the round's part of it placed on the device once, kept while the
assignment stays the same."""

from __future__ import annotations

import numpy as np
import torch

from fedsync.base.errors import DataError
from fedsync.learning.data import Dataset, Source
from fedsync.learning.partition import hold_out
from fedsync.learning.tasks import DataOptions, Task
from fedsync.learning.train import place
from fedsync.run.config import RunConfig
from fedsync.storage.markers import FileRef
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified


class WorkerData:
    def __init__(self, share: Share, task: Task, cfg: RunConfig, device: str) -> None:
        self.share, self.task, self.cfg, self.device = share, task, cfg, device
        self.dataset: Dataset | None = None  # a shared task's data set: shards are cut from its training part
        self.own: Source | None = None       # a private task's data: this machine's own, all of it trained on
        self.placed: tuple[tuple[str, int], tuple[Source, Source]] | None = None  # (list hash, shard): on the device

    def load(self, location: str | None, options: DataOptions) -> Source:
        """The data this worker trains on: for a private task its own, else the shared data set whose training part
        the coordinator's shard lists index."""
        if self.task.private:
            self.own = self.task.load_own(location, options)
            return self.own
        self.dataset = self.task.load(location, options)
        return self.dataset.train

    def on_device(self, shards: FileRef | None, index: int | None) -> tuple[Source, Source]:
        """The training and held-out parts (federated_eval) of the shard, or of this worker's own data, placed on the
        device once and kept there while the assignment stays the same."""
        key = ("own", -1) if index is None or shards is None else (shards.blake3, index)
        if self.placed is None or self.placed[0] != key:
            self.placed = None  # free the old copy first
            if index is None:
                if self.own is None:
                    raise DataError(f"task {self.cfg.task}'s data is shared, yet the assignment gives this worker "
                                    "no shard: the coordinator's fedsync differs")
                data, rows = self.own, np.arange(len(self.own))
            elif shards is None or self.dataset is None:
                raise DataError(f"task {self.cfg.task} trains on each worker's own data, yet the assignment gives this "
                                f"worker shard {index}: the coordinator's fedsync differs")
            else:
                data, rows = self.dataset.train, self._shard_rows(shards, index)
            kept, held = hold_out(rows, self.cfg.federated_eval)
            self.placed = (key, (place(data.subset(kept), self.device), place(data.subset(held), self.device)))
        return self.placed[1]

    def _shard_rows(self, shards: FileRef, index: int) -> np.ndarray:
        """Shard `index` of the coordinator's list, as rows of this machine's training data (the list names examples
        by their index in the task's whole data, PROTOCOL.md 5.4)."""
        listed = load_verified(self.share, shards.file, shards).get(str(index))
        if listed is None or listed.dtype != torch.int64 or listed.dim() != 1:
            raise DataError(f"{shards.file} has no int64 list for shard {index}: the coordinator's fedsync differs")
        canonical = self.dataset.canonical()  # type: ignore[union-attr]
        order = np.argsort(canonical)
        wanted = listed.numpy()
        at = np.searchsorted(canonical, wanted, sorter=order).clip(0, len(order) - 1)
        rows = order[at]
        if not np.array_equal(canonical[rows], wanted):
            raise DataError(f"{shards.file} lists examples for shard {index} that this machine's training data does "
                            "not hold: the task's data differs from the coordinator's (another version or copy)")
        return rows  # in the list's order: the held-out rule counts positions in it
