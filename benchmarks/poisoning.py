"""Poisoning table: final test accuracy on digits with 5 workers, one of them attacking every round, under each
aggregation setup, next to the clean run; IID and Dirichlet(0.5) shards.

Every round is real: each worker trains the digits CNN on its shard (fedsync/learning/train.py), its delta is
written as a safetensors file, and the coordinator's own parts take it in: the streaming intake (norms measured
while reading), screening, clipping and the rule, then the non-finite fallback. Only the processes and the share's
markers are left out, so 50 runs fit in minutes.

Attacks (worker w0, every round, from its honestly trained delta d):
- x1000: 1000 d.  huge: every value 1e38.  flip x10: -10 d.
- little is enough (Baruch et al. 2019, "A Little Is Enough: Circumventing Defenses For Distributed Learning"):
  per coordinate, the mean of the four honest deltas minus one standard deviation of them.

Usage: python benchmarks/poisoning.py [ROUNDS]   (default 10; prints a markdown table)
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.rules import make_rule
from fedsync.aggregation.screening import outliers
from fedsync.fedavg import apply_delta, delta, l2_norm
from fedsync.learning.partition import partition
from fedsync.learning.tasks import get_task
from fedsync.learning.train import TrainSettings, evaluate, local_train
from fedsync.run.config import RunConfig, load_config
from fedsync.storage.local import LocalStore
from fedsync.storage.reasons import Reason, Unusable
from fedsync.tensors.files import layout_of, save_state

WORKERS = 5
CLIP_NORM = 5.0  # about the honest updates' median norm here (summary.yaml lists each accepted update's norm)
State = dict[str, torch.Tensor]
Attack = Callable[[State, list[State]], State]


def _floats(d: State, f: Callable[[str, torch.Tensor], torch.Tensor]) -> State:
    return {k: f(k, v) if v.is_floating_point() else v for k, v in d.items()}


def _little_is_enough(own: State, honest: list[State]) -> State:
    def shifted(k: str, v: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([h[k] for h in honest])
        return stacked.mean(dim=0) - stacked.std(dim=0)
    return _floats(own, shifted)


ATTACKS: dict[str, Attack | None] = {
    "clean": None,
    "x1000": lambda d, _: _floats(d, lambda k, v: v * 1000),
    "huge": lambda d, _: _floats(d, lambda k, v: torch.full_like(v, 1e38)),
    "flip x10": lambda d, _: _floats(d, lambda k, v: v * -10),
    "little is enough": _little_is_enough,
}


@dataclass(frozen=True)
class Setup:
    name: str
    aggregation: str = "fedavg"
    screen: bool = True
    clip: bool = False
    screen_factor: float | None = None  # None: the config's


SETUPS = [Setup("FedAvg, no screening", screen=False), Setup("FedAvg + screening (default)"),
          Setup("FedAvg + screening, screen_factor 4", screen_factor=4.0),
          Setup("FedAvg + screening + clip_norm", clip=True), Setup("trimmed mean 0.2 + screening", "trimmed_mean"),
          Setup("median + screening", "median")]


def run(cfg: RunConfig, setup: Setup, attack: Attack | None, rounds: int, clip_norm: float,
        data, shards, ratios: list[float] | None = None) -> tuple[float, int | None]:
    """One federated run in-process: the final test accuracy, and the round in which it stopped because no update
    was usable (every one non-finite after a poisoned round: the coordinator stops with exit 9 there), or None."""
    task = get_task(cfg.task)
    model = task.build_model(cfg.model, seed=cfg.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rule = make_rule(setup.aggregation, cfg.momentum, 0.2)
    parameters = frozenset(n for n, _ in model.named_parameters())
    settings = TrainSettings(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, augment=None)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        for r in range(1, rounds + 1):
            deltas, samples = [], []
            for i, shard in enumerate(shards):
                local = task.build_model(cfg.model)
                local.load_state_dict(state)
                result = local_train(local, data.train.subset(shard), settings, "cpu", seed=1000 * r + i)
                deltas.append(delta(local.state_dict(), state))
                samples.append(result.samples)
            if attack is not None:
                deltas[0] = attack(deltas[0], deltas[1:])
            cands = [Candidate(f"w{i}", f"{r}-w{i}.safetensors",
                               save_state(store.write, f"{r}-w{i}.safetensors", d), float(samples[i]), r)
                     for i, d in enumerate(deltas)]
            agg = Aggregator(layout_of(state), store, round=r)
            try:
                agg.take(cands)
                if setup.screen:
                    found = outliers(agg.norms, l2_norm(state), setup.screen_factor or cfg.screen_factor,
                                     cfg.screen_max_ratio)
                    agg.drop({c: Unusable(Reason.NORM_OUTLIER, why) for c, why in found.items()})
                if ratios is not None:
                    ratios.append(max(agg.norms.values()) / statistics.median(agg.norms.values()))
                if setup.clip:
                    agg.clip(clip_norm)
                while True:  # the coordinator's fallback: never a non-finite model
                    if not agg.accepted:  # every update rejected: the coordinator stops here (exit 9)
                        model.load_state_dict(state)
                        return evaluate(model, data.test, cfg.eval_batch_size)[1], r
                    new = apply_delta(state, rule.aggregate(agg.collected(parameters)).delta)
                    if all(bool(torch.isfinite(v).all()) for v in new.values() if v.is_floating_point()):
                        break
                    worst = max(agg.norms, key=lambda c: agg.norms[c])
                    agg.drop({worst: Unusable(Reason.SPOILS_AGGREGATE, "not finite")})
            finally:
                agg.close()
            state = new
    model.load_state_dict(state)
    return evaluate(model, data.test, cfg.eval_batch_size)[1], None


def main(rounds: int = 10) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    for part in ("iid", "dirichlet"):
        cfg = load_config("digits", {"partition": part, "dirichlet_alpha": 0.5})
        data = get_task(cfg.task).load(None, cfg.data_options())
        shards = partition(data.train.y.numpy(), WORKERS, cfg.partition, cfg.seed, cfg.dirichlet_alpha)
        ratios: list[float] = []
        clean, _ = run(cfg, SETUPS[1], None, rounds, 0.0, data, shards, ratios)
        print(f"\n{part}: clean run (default setup) {clean:.4f}; largest honest norm / the round's median: "
              f"{max(ratios):.2f} (screen_factor {cfg.screen_factor:g}); clip_norm {CLIP_NORM:g}")
        print("| setup | " + " | ".join(ATTACKS) + " |")
        print("|---|" + "---|" * len(ATTACKS))
        for setup in SETUPS:
            cells = []
            for name, attack in ATTACKS.items():
                acc, stopped = (clean, None) if (setup == SETUPS[1] and attack is None) else \
                    run(cfg, setup, attack, rounds, CLIP_NORM, data, shards)
                cell = f"{acc:.3f} ({100 * (acc - clean):+.1f})" if math.isfinite(acc) else "nan"
                cells.append(cell + (f", stopped in round {stopped}" if stopped else ""))
            print(f"| {setup.name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{rounds} rounds, {WORKERS} workers (w0 attacks every round); accuracy (points against the clean "
          f"default run); {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
