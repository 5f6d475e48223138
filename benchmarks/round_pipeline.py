"""Rounds end to end: a coordinator and two workers (real processes) on CIFAR-10-shaped data, fabricated in the real
on-disk format, resnet18_cifar, three rounds. Per round it prints the workers' training time and their hand-off
times (assignment seen to training start; training end to update written), the time between rounds (assignment
to next assignment), the coordinator's evaluation time, the ratio round time / training time,
and how long after the round's last update the next round opened: with the evaluation beside the next round, that
gap does not grow with the evaluation's cost.

Usage: python benchmarks/round_pipeline.py [--train-per-batch N] [--test N] [--device cpu|cuda]
  (defaults: 100 images in each of the 5 train batches, 2,000 test images, cpu: sized for a 2-core box, where the
  evaluation costs more than a round's training; on a GPU machine use the full 10,000 / 50,000 and --device cuda)
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/cifar_files.py: the fabricator

from fedsync.storage.markers import Assignment, Evaluation, Summary, UpdateMarker, parse  # noqa: E402
from fedsync.storage.share import Share  # noqa: E402
from tests.cifar_files import fabricate_cifar10  # noqa: E402

ROUNDS = 3
WORKERS = ("w1", "w2")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-per-batch", type=int, default=100)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, share = Path(tmp) / "data", Path(tmp) / "share"
        fabricate_cifar10(data, args.train_per_batch, test=args.test)
        share.mkdir()
        fed = [sys.executable, "-m", "fedsync"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDSYNC_KEY_DIR": str(Path(tmp) / "keys")}
        common = ["--config", "cifar10", "--set", f"data_root={data}", "--set", "verify_checksums=false"]
        started = time.perf_counter()
        procs = [subprocess.Popen(fed + ["coordinator", "--share", str(share), "--rounds", str(ROUNDS), *common,
                                         "--set", "min_workers=2", "--device", args.device],
                                  env=env, stdout=subprocess.DEVNULL)]
        procs += [subprocess.Popen(fed + ["worker", "--share", str(share), "--name", w, "--device", args.device,
                                          "--wait-for-run", "120"], env=env, stdout=subprocess.DEVNULL)
                  for w in WORKERS]
        while any(proc.poll() is None for proc in procs):
            failed = [proc for proc in procs if proc.poll() not in (None, 0)]
            if failed or time.perf_counter() - started > 1800:
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"{[proc.args[3] for proc in failed] or 'the run'} failed or took over 30 min")
            time.sleep(0.5)
        wall = time.perf_counter() - started
        s = Share(share)
        mtime = lambda name: s.path(name).stat().st_mtime  # noqa: E731 - one process's writes, one clock
        print(f"{ROUNDS} rounds, resnet18_cifar, {5 * args.train_per_batch} training / {args.test} test images, "
              f"2 workers and the coordinator on {args.device}, run {wall:.1f} s")
        gaps = []
        for r in range(1, ROUNDS + 1):
            a = parse(Assignment, s.read_yaml(s.assignment(r)), "a")
            markers = [parse(UpdateMarker, s.read_yaml(s.update_marker(r, w)), "m") for w in a.workers]
            train = max(m.timings["train_s"] for m in markers)
            prepare = max(m.timings["prepare_s"] for m in markers)
            publish = max(m.timings["publish_s"] for m in markers)
            last_update = max(mtime(s.update_marker(r, w)) for w in a.workers)
            summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
            ev = parse(Evaluation, s.read_yaml(s.evaluation(r)), "e")
            line = (f"  round {r}: training {train:.2f} s (slowest worker; assignment to training {prepare:.2f} s, "
                    f"training to update written and signed {publish:.2f} s), evaluation {ev.seconds:.2f} s "
                    f"({ev.samples} images, landed {mtime(s.evaluation(r)) - mtime(s.summary(r)):.2f} s after the "
                    f"close), round collected for {summary.seconds:.2f} s")
            if r < ROUNDS:
                between = mtime(s.assignment(r + 1)) - mtime(s.assignment(r))
                gap = mtime(s.assignment(r + 1)) - last_update
                gaps.append(gap)
                line += (f", assignment to next assignment {between:.2f} s = {between / train:.2f}x training; "
                         f"last update to next round open {gap:.2f} s")
            print(line)
        print(f"  last update to next round open: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s "
              "(goal: within 1 s, whatever the evaluation costs)")


if __name__ == "__main__":
    main()
