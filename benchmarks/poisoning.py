"""Poisoning table: final test accuracy on digits with 5 workers (7 for Krum's rules and Bulyan), one or two of them
attacking every round, under each aggregation setup, next to the clean run; IID and Dirichlet(0.5) shards.

Every round is real: each worker trains the digits CNN on its shard (fedsync/learning/train.py), its delta is
written as a safetensors file, and the coordinator's own parts take it in: the streaming intake (norms and buffer
validity checked while reading), the screens in the coordinator's order (fedsync/aggregation/defence.py: on
arrival, at the close, after the rule) and the rule. Only the processes and the share's markers are left out (the
marker checks, such as the bound on claimed samples, are tested through real processes in tests/test_attacks.py),
so a table of 150 runs fits in minutes.

Attacks (worker w0, or w0 and w1, every round, from its honestly trained delta d):
- replay: its round-1 delta again every round.   stale var: d with every BatchNorm running_var delta pushed to
  -0.99 x the global variance (valid, but one such update would shrink every variance 100-fold under a mean).
- flip x5: -5 d.   x1000: 1000 d.   huge: every value 1e38.   noise: Gaussian noise of 10 x d's norm.
- count overflow: d with num_batches_tracked grown by 2^63 - 1.
- ALIE, "a little is enough" (Baruch et al. 2019): per coordinate, the mean of the honest deltas minus one
  standard deviation of them; from one attacker, and from two sending the same.

Usage: python benchmarks/poisoning.py [ROUNDS] [SETUP ...]   (default 10 rounds, every setup; a markdown table)
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.defence import at_close, on_arrival, spoiled
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.rules import make_rule
from fedsync.aggregation.validity import validity_of
from fedsync.fedavg import apply_delta, delta, l2_norm
from fedsync.learning.models import constrained_buffers
from fedsync.learning.partition import partition
from fedsync.learning.tasks import get_task
from fedsync.learning.train import TrainSettings, evaluate, local_train
from fedsync.run.config import RunConfig, load_config
from fedsync.storage.local import LocalStore
from fedsync.tensors.files import layout_of, save_state

WORKERS = 5
State = dict[str, torch.Tensor]


@dataclass
class Context:
    """What an attacker knows: the round, the global model, the honest deltas, its own round-1 delta."""

    round: int
    state: State
    honest: list[State]
    first: dict[int, State]


Attack = Callable[[int, State, Context], State]  # (attacker index, its honest delta, context) -> what it sends


def _floats(d: State, f: Callable[[str, torch.Tensor], torch.Tensor]) -> State:
    return {k: f(k, v) if v.is_floating_point() else v for k, v in d.items()}


def _alie(i: int, own: State, ctx: Context) -> State:
    def shifted(k: str, v: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([h[k] for h in ctx.honest])
        return stacked.mean(dim=0) - stacked.std(dim=0)
    return _floats(own, shifted)


def _noise(i: int, own: State, ctx: Context) -> State:
    gen = torch.Generator().manual_seed(ctx.round)
    noise = _floats(own, lambda k, v: torch.randn(v.shape, generator=gen))
    scale = 10 * l2_norm(own) / l2_norm(noise)
    return _floats(noise, lambda k, v: v * scale)


def _stale_var(i: int, own: State, ctx: Context) -> State:
    return {k: -0.99 * ctx.state[k] if k.endswith("running_var") else v for k, v in own.items()}


def _overflow(i: int, own: State, ctx: Context) -> State:
    return {k: torch.full_like(v, 2 ** 63 - 1) if k.endswith("num_batches_tracked") else v for k, v in own.items()}


ATTACKS: dict[str, tuple[Attack | None, int]] = {  # name -> (attack, attackers)
    "clean": (None, 0),
    "replay": (lambda i, d, ctx: ctx.first[i], 1),
    "stale var": (_stale_var, 1),
    "flip x5": (lambda i, d, ctx: _floats(d, lambda k, v: v * -5), 1),
    "x1000": (lambda i, d, ctx: _floats(d, lambda k, v: v * 1000), 1),
    "huge": (lambda i, d, ctx: _floats(d, lambda k, v: torch.full_like(v, 1e38)), 1),
    "noise": (_noise, 1),
    "count overflow": (_overflow, 1),
    "ALIE 1 of 5": (_alie, 1),
    "ALIE 2 of 5": (_alie, 2),
}


@dataclass(frozen=True)
class Setup:
    name: str
    overrides: tuple[tuple[str, object], ...] = ()
    workers: int = WORKERS  # Krum's rules need 2f + 3 updates left after the screens, Bulyan 4f + 3: more workers


SETUPS = [
    Setup("defaults"),
    Setup("norm screen only (screen_direction false, clip_factor 0)",
          (("screen_direction", False), ("clip_factor", 0.0))),
    Setup("clip_norm 5 (round 1's median norm)", (("clip_norm", 5.0),)),
    Setup("median + clip_factor 1 (robust)", (("aggregation", "median"), ("clip_factor", 1.0))),
    Setup("trimmed_mean 0.2", (("aggregation", "trimmed_mean"), ("trim", 0.2))),
    Setup("7 workers: defaults", workers=7),
    Setup("7 workers: multi_krum, byzantine 1", (("aggregation", "multi_krum"), ("min_updates", 5)), 7),
    Setup("7 workers: krum, byzantine 1", (("aggregation", "krum"), ("min_updates", 5)), 7),
    Setup("7 workers: bulyan, byzantine 1", (("aggregation", "bulyan"), ("min_updates", 7),
                                             ("screen_direction", False), ("clip_factor", 0.0), ("screen_factor", 0.0),
                                             ("screen_max_ratio", 0.0)), 7),
]


def run(cfg: RunConfig, attack: Attack | None, attackers: int, rounds: int, data, shards) -> tuple[float, str]:
    """One federated run in-process: the final test accuracy, and where it stopped early, or "": in the round where
    no update was usable (the coordinator stops with exit 9 there), or where fewer than min_updates were left (the
    coordinator waits there for more)."""
    task = get_task(cfg.task)
    model = task.build_model(cfg.model, seed=cfg.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rule = make_rule(cfg.aggregation, cfg.momentum, cfg.trim, cfg.byzantine)
    parameters = frozenset(n for n, _ in model.named_parameters())
    trained = {k: state[k].numel() for k in sorted(parameters)}
    buffers = constrained_buffers(model)
    screens = cfg.screens()
    settings = TrainSettings(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, augment=None)
    first: dict[int, State] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        for r in range(1, rounds + 1):
            deltas, samples, steps = [], [], []
            for i, shard in enumerate(shards):
                local = task.build_model(cfg.model)
                local.load_state_dict(state)
                result = local_train(local, data.train.subset(shard), settings, "cpu", seed=1000 * r + i)
                deltas.append(delta(local.state_dict(), state))
                samples.append(result.samples)
                steps.append(result.steps)
                first.setdefault(i, deltas[-1])
            if attack is not None:
                ctx = Context(r, state, deltas[attackers:], first)
                deltas[:attackers] = [attack(i, deltas[i], ctx) for i in range(attackers)]
            cands = [Candidate(f"w{i}", f"{r}-w{i}.safetensors",
                               save_state(store.write, f"{r}-w{i}.safetensors", d), float(samples[i]), r, steps[i])
                     for i, d in enumerate(deltas)]
            validity = validity_of(buffers, state)
            agg = Aggregator(layout_of(state), store, round=r, validity=validity)
            try:
                agg.take(cands)
                on_arrival(agg, screens, l2_norm(state))
                while True:  # the coordinator's close: every worker has reported
                    if len(agg.accepted) < max(1, cfg.min_updates):
                        model.load_state_dict(state)
                        why = "stopped" if not agg.accepted else "waits for min_updates"
                        return evaluate(model, data.test, cfg.eval_batch_size)[1], f"{why} in round {r}"
                    if at_close(agg, screens, trained)[1]:
                        continue
                    new = apply_delta(state, rule.aggregate(agg.collected(parameters)).delta)
                    if not spoiled(agg, new, validity)[1]:
                        break
            finally:
                agg.close()
            state = new
    model.load_state_dict(state)
    return evaluate(model, data.test, cfg.eval_batch_size)[1], ""


def main(rounds: int = 10, names: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    setups = [s for s in SETUPS if not names or any(n in s.name for n in names)]
    for part in ("iid", "dirichlet"):
        base = load_config("digits", {"partition": part, "dirichlet_alpha": 0.5})
        data = get_task(base.task).load(None, base.data_options())
        for workers in sorted({s.workers for s in setups}):
            shards = partition(data.train.y.numpy(), workers, base.partition, base.seed, base.dirichlet_alpha)
            clean, _ = run(base, None, 0, rounds, data, shards)
            print(f"\n{part}, {workers} workers: clean run with the defaults {clean:.4f}")
            print("| setup | " + " | ".join(ATTACKS) + " |")
            print("|---|" + "---|" * len(ATTACKS))
            for setup in (s for s in setups if s.workers == workers):
                cfg = replace(base, **dict(setup.overrides))
                cells = []
                for name, (attack, attackers) in ATTACKS.items():
                    acc, stopped = (clean, "") if (not setup.overrides and attack is None) else \
                        run(cfg, attack, attackers, rounds, data, shards)
                    cell = f"{acc:.3f} ({100 * (acc - clean):+.1f})" if math.isfinite(acc) else "nan"
                    cells.append(cell + (f", {stopped}" if stopped else ""))
                print(f"| {setup.name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{rounds} rounds; accuracy (points against the clean run with the defaults and as many workers); "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, sys.argv[2:])
