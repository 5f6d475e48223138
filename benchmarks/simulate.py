"""A federated run in one process, from fedsync's own parts, for benchmarks that compare many runs: every worker
trains for real (fedsync/learning/train.py), its delta is encoded in the run's compression (with the worker's error
feedback) and written as a safetensors file, and the coordinator's intake decodes it while streaming, then the rule
and the server optimizer make the next model. Only the processes and the share's markers are left out.

With `clip_norm` the coordinator's screens and clip act on each update as it is added; with the config's `dp`, each
update is clipped to `clip_norm` by the coordinator's own screen, weighs 1, and the sum
gets the coordinator's central Gaussian noise over the workers' count (fedsync/aggregation/privacy/mean.py).

Data: `digits` (the embedded 8x8 digits and the config's digits model), or `digits32`, a CIFAR-10-shaped
stand-in (no CIFAR-10 can be downloaded here): the same digits resized to 3x32x32 and trained with the imagefolder
task's image_cnn.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.defence import on_arrival
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.optimizers import make_optimizer
from fedsync.aggregation.privacy.mean import PrivateMean
from fedsync.aggregation.rules import make_rule
from fedsync.fedavg import delta, l2_norm
from fedsync.learning.data import Dataset, Split
from fedsync.learning.partition import partition
from fedsync.learning.tasks import Task, TaskSettings, get_task
from fedsync.learning.train import TrainSettings, evaluate, local_train
from fedsync.run.config import RunConfig
from fedsync.storage.local import LocalStore
from fedsync.tensors.files import layout_of, save_state
from fedsync.tensors.residuals import ErrorFeedback, encoded_update

DATASETS = ("digits", "digits32")


@dataclass
class Trace:
    accuracy: list[float] = field(default_factory=list)  # test accuracy after each round
    up_bytes: list[int] = field(default_factory=list)    # update bytes written each round, all workers
    steps: int = 0                                       # local optimizer steps, all workers and rounds
    stuck: int | None = None                             # dp: the round whose every update diverged (the run ends)
    seconds: float = 0.0

    def rounds_to(self, target: float) -> int | None:
        """The first round whose accuracy reaches `target`."""
        return next((r for r, a in enumerate(self.accuracy, 1) if a >= target), None)


def task_and_data(name: str, cfg: RunConfig) -> tuple[Task, str, Dataset]:
    """The task, its model's name and the data set of a benchmark data set name."""
    digits = get_task("digits")
    data = digits.load(None, cfg.data_options(lambda _: None))
    if name == "digits":
        return digits, cfg.model if cfg.model.startswith("digits") else "digits_cnn", data

    def grow(split: Split) -> Split:
        return Split(F.interpolate(split.x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1),
                     split.y)

    shaped = get_task("imagefolder").configured(TaskSettings(tuple(str(i) for i in range(10)), 32, 3))
    return shaped, "image_cnn", Dataset(grow(data.train), grow(data.test), data.num_classes)


def simulate(cfg: RunConfig, dataset: str, workers: int, rounds: int) -> Trace:
    """One run of `rounds` rounds with `workers` workers, as `cfg` says (partition, local work, rule, server optimizer,
    compression and error feedback)."""
    task, model_name, data = task_and_data(dataset, cfg)
    shards = partition(data.train.y.numpy(), workers, cfg.partition, cfg.seed, cfg.dirichlet_alpha)
    model = task.build_model(model_name, seed=cfg.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parameters = frozenset(n for n, _ in model.named_parameters())
    rule = make_rule(cfg.aggregation, cfg.momentum, cfg.trim)
    optimizer = make_optimizer(cfg.server_settings(), parameters)
    settings = TrainSettings(epochs=cfg.local_epochs, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay, augment=None)
    trace, server_state = Trace(), {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        feedback = [ErrorFeedback(Path(tmp) / "residuals", "bench", f"w{i}", print)
                    for i in range(workers)]
        for r in range(1, rounds + 1):
            if cfg.dp is not None:  # seeded per round: runs repeat exactly (fedsync itself seeds from the OS)
                std = cfg.dp.noise_multiplier * cfg.clip_norm
                rule = PrivateMean(std, workers, torch.Generator().manual_seed(cfg.seed * 100_003 + r))
            candidates = []
            for i, shard in enumerate(shards):
                local = task.build_model(model_name)
                local.load_state_dict(state)
                result = local_train(local, data.train.subset(np.asarray(shard)), settings, "cpu", seed=1000 * r + i)
                trace.steps += result.steps
                d = delta(local.state_dict(), state)
                written = encoded_update(r, d, cfg.compression, feedback[i] if cfg.error_feedback else None)
                ref = save_state(store.write, f"{r}-w{i}.safetensors", written)
                candidates.append(Candidate(f"w{i}", f"{r}-w{i}.safetensors", ref,
                                            rule.weight(result.samples, result.steps) if cfg.dp else
                                            float(result.samples), r, result.steps, cfg.compression))
            trace.up_bytes.append(sum(c.ref.bytes for c in candidates))
            agg = Aggregator(layout_of(state), store, round=r)
            try:
                outcomes = agg.take(candidates)
                if cfg.dp is not None or cfg.clip_norm > 0:  # the coordinator's screens and clip, as it runs them
                    outcomes += on_arrival(agg, cfg.screens(), l2_norm(state))
                problems = [o.problem for o in outcomes if o.problem is not None]
                if problems and cfg.dp is None:
                    raise SystemExit(f"round {r}: an update was not taken in: {problems[0].detail}")
                if len(problems) == len(candidates):  # dp: the noised model diverges everywhere, as a run stops
                    trace.stuck = r
                    break
                aggregate = rule.aggregate(agg.collected(parameters)).delta
            finally:
                agg.close()
            state, server_state = optimizer.step(state, aggregate, server_state)
            model.load_state_dict(state)
            trace.accuracy.append(evaluate(model, data.test, cfg.eval_batch_size)[1])
    trace.seconds = time.perf_counter() - started
    return trace
