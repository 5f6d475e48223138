"""A mixed-speed run: two worker processes on digits, one slowed (FEDSYNC_SLOWDOWN, 4x by default), with equal
work per worker (the baseline) against `balance: throughput`, with and without FedNova, in the same run.
Prints each setting's median round time, run wall time and final test accuracy after the same number of rounds,
and, per round, the test loss and FedNova's step scale (to see an early-round overshoot).
Usage: python benchmarks/mixed_speed.py [--rounds N] [--local-epochs E] [--slowdown F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsync.storage.markers import Evaluation, Summary, parse
from fedsync.storage.share import Share

SETTINGS = {"equal shards (baseline)": ["balance=equal"],
            "balance: throughput": ["balance=throughput"],
            "balance: throughput + fednova": ["balance=throughput", "aggregation=fednova"]}


def one_run(share: Path, rounds: int, epochs: int, slowdown: float, sets: list[str]
            ) -> tuple[float, float, list[Summary], list[Evaluation]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fed = [sys.executable, "-m", "fedsync"]
    overrides = [a for s in ["min_workers=2", f"local_epochs={epochs}", *sets] for a in ("--set", s)]
    t = time.perf_counter()
    procs = [subprocess.Popen(fed + ["coordinator", "--share", str(share), "--rounds", str(rounds), *overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for name, slow in (("fast", "1"), ("slow", f"{slowdown:g}")):
        procs.append(subprocess.Popen(fed + ["worker", "--share", str(share), "--name", name, "--device", "cpu",
                                             "--wait-for-run", "60"], env={**env, "FEDSYNC_SLOWDOWN": slow},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        sys.exit("a process failed:\n" + "\n".join(outs))
    s = Share(share)
    summaries = [parse(Summary, s.read_yaml(s.summary(r)), "summary") for r in range(1, rounds + 1)]
    evaluations = [parse(Evaluation, s.read_yaml(s.evaluation(r)), "evaluation") for r in range(1, rounds + 1)]
    return statistics.median(x.seconds for x in summaries[1:]), wall, summaries, evaluations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=4)
    ap.add_argument("--slowdown", type=float, default=4.0, help="how many times slower the slow worker trains")
    args = ap.parse_args()
    print(f"digits, 2 worker processes (1 CPU thread each; 'slow' at 1/{args.slowdown:g} speed), {args.rounds} "
          f"rounds, local_epochs {args.local_epochs}")
    base = None
    for label, sets in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            median, wall, summaries, evaluations = one_run(Path(tmp), args.rounds, args.local_epochs, args.slowdown,
                                                           sets)
        base = base or median
        steps = " / ".join(f"{x.worker} {x.steps}" for x in summaries[-1].accepted)
        print(f"  {label:31s} median round {median:6.2f} s ({median / base:.2f}x baseline), run {wall:5.1f} s, "
              f"final test accuracy {evaluations[-1].test_accuracy:.4f}; last round's steps: {steps}")
        print("    per round, test loss (step scale): " + ", ".join(
            f"{e.test_loss:.2f} ({x.step_scale:.2f})" for x, e in zip(summaries, evaluations)))


if __name__ == "__main__":
    main()
