"""What each round asks of whom: which live workers can train, the training set cut into shards (their list in
the share), and each worker's task, its steps sized by its measured speed under `balance: throughput`
(fedsync/learning/balance.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedsync.base.logs import Log
from fedsync.learning.balance import plan_steps
from fedsync.learning.data import Dataset
from fedsync.learning.partition import hold_out, partition
from fedsync.learning.tasks import Task
from fedsync.run.config import RunConfig
from fedsync.run.coordinating.ledger import Bound
from fedsync.run.liveness import Liveness
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.markers import Assignment, FileRef, WorkerTask
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.tensors.files import state_bytes


class Planner:
    def __init__(self, share: Share, cfg: RunConfig, task: Task, dataset: Dataset | None, liveness: Liveness,
                 log: Log) -> None:
        self.share, self.cfg, self.task, self.dataset = share, cfg, task, dataset
        self.liveness, self.log = liveness, log
        self.cuts: dict[int, tuple[list[np.ndarray], FileRef]] = {}  # by shard count: the shards and their list
        self.unequipped: set[str] = set()  # workers of a private task that registered no data of their own: said

    def equipped(self, worker: str) -> bool:
        """Whether the worker can train: for a private task, it registered data of its own (said once if not)."""
        if not self.task.private or self.liveness.info[worker].own_samples:
            return True
        if worker not in self.unequipped:
            self.unequipped.add(worker)
            self.log(f"WARNING: worker {worker} registered no data of its own; task {self.cfg.task} trains on each "
                     "worker's own folder (fedsync worker --data DIR): it gets no work")
        return False

    def cut(self, num_shards: int) -> tuple[list[np.ndarray], FileRef | None]:
        """The training set cut `num_shards` ways (positions in this machine's training split), and its list
        shards/NNN.safetensors, written when absent or not what it should be: each shard's examples by their index
        in the task's whole data (PROTOCOL.md 5.4), so a worker needs no random generator to find them. Once per
        shard count and process: the cut follows from the config alone. A private task has no shards."""
        dataset = self.dataset
        if dataset is None:
            return [], None
        if num_shards not in self.cuts:
            shards = partition(dataset.train.y.numpy(), num_shards, self.cfg.partition, self.cfg.seed,
                               self.cfg.dirichlet_alpha)
            canonical = dataset.canonical()
            data = state_bytes({str(i): torch.as_tensor(canonical[part], dtype=torch.int64)
                                for i, part in enumerate(shards)})
            name = names.shard_list(num_shards)
            ref = FileRef(name, hash_bytes(data), len(data))
            try:
                self.share.read_verified(name, ref)
            except Unusable:  # absent, or not this list: written (again) now
                self.share.make_folder(names.SHARDS)
                self.share.write(name, data)
            self.cuts[num_shards] = (shards, ref)
        return self.cuts[num_shards]

    def bound(self, a: Assignment, worker: str) -> Bound:
        """What `worker`'s update for assignment `a` may claim: on a private task the examples it registered; on a
        shared one the rows of its shard it trains on (the rest is held out for federated evaluation), and with
        local_steps no more than steps x batch_size of them."""
        task = a.workers[worker]
        if task.samples is not None or task.shard is None:
            own = task.samples or 0
            return Bound(own, own, f"{worker} registered {own}")
        shard = self.cut(a.num_shards)[0][task.shard]
        kept = len(hold_out(shard, self.cfg.federated_eval)[0])
        if task.local_steps is not None and task.local_steps * self.cfg.batch_size < kept:
            most = task.local_steps * self.cfg.batch_size
            return Bound(most, len(shard), f"{task.local_steps} steps of {self.cfg.batch_size} train on at most {most}")
        return Bound(kept, len(shard), f"shard {task.shard} of {a.num_shards} holds {kept} examples to train on")

    def tasks(self, r: int, workers: list[str], shards: list[np.ndarray]) -> dict[str, WorkerTask]:
        """Shard i to the i-th worker, or for a private task each worker's own data (its registered sample count
        bounds what it may claim); with balance: throughput, steps sized by each worker's published speed."""
        cfg = self.cfg
        if self.task.private:
            owned = {w: self.liveness.info[w].own_samples or 0 for w in workers}
            equal = {w: WorkerTask(shard=None, local_epochs=cfg.local_epochs, samples=owned[w],
                                   local_steps=cfg.local_steps) for w in workers}
            sizes = {w: np.arange(owned[w]) for w in workers}
        else:
            equal = {w: WorkerTask(shard=i, local_epochs=cfg.local_epochs, local_steps=cfg.local_steps)
                     for i, w in enumerate(workers)}
            sizes = {w: shards[i] for i, w in enumerate(workers)}
        if cfg.balance != "throughput":
            return equal
        speeds = {w: self.liveness.info[w].samples_per_s for w in workers}
        unknown = sorted(w for w, s in speeds.items() if not s)
        if unknown:
            self.log(f"round {r}: equal work: no measured speed from {', '.join(unknown)} yet")
            return equal
        trained = {w: len(hold_out(rows, cfg.federated_eval)[0]) for w, rows in sizes.items()}
        steps = plan_steps(trained, speeds,  # type: ignore[arg-type]
                           cfg.local_epochs, cfg.batch_size, cfg.round_timeout, cfg.local_steps)
        self.log(f"round {r}: steps by throughput: " + ", ".join(
            f"{w} {steps[w]} ({speeds[w]:.0f} samples/s)" for w in workers))
        return {w: replace(t, local_steps=steps[w]) for w, t in equal.items()}
