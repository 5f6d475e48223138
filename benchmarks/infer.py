"""Batch inference over the share (docs/PROTOCOL.md section 5.14) against a bare in-process loop, in the same run.

After a one-round digits run (the weights do not change the cost), 100,000 digits-shaped inputs are predicted
(1) by a bare loop in this process: the run's final model, `fedsync.learning.predict.predict` over all of them in
batches of the run's eval_batch_size, on the CPU with torch's default threads; (2) by the same loop in two
processes of one thread each, half the inputs each (the most two workers sharing these cores could do); (3) by `fedsync
infer` with two serving worker processes (`--serve`, one CPU thread each: two CPU workers on this machine's two
cores), timed from the job's submission to its merged CSV (the command's wall time, Python's and torch's start
included, is printed too). The three are interleaved and repeated, and the medians compared. Last, (4) a job with
one of the two workers slowed down (FEDSYNC_SLOWDOWN), printing the chunks each ran.
Usage: python benchmarks/infer.py [--inputs N] [--repeats R] [--slowdown F] [--chunk-rows N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from fedsync.learning.predict import predict
from fedsync.learning.tasks import get_task
from fedsync.storage.jobfiles import read_plan
from fedsync.storage.markers import FinalMarker, JobPlan, WorkerInfo
from fedsync.storage.share import Share

FED = [sys.executable, "-m", "fedsync"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \[infer\] (.*)$", re.M)


def trained(share: Path) -> None:
    procs = [subprocess.Popen(FED + ["coordinator", "--share", str(share), "--rounds", "1"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(FED + ["worker", "--share", str(share), "--name", "trainer", "--wait-for-run", "60"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("the training run failed:\n" + "\n".join(outs))


def serving(share: Path, name: str, slowdown: float) -> subprocess.Popen[str]:
    env = {**ENV, "OMP_NUM_THREADS": "1", "FEDSYNC_SLOWDOWN": f"{slowdown:g}"}
    return subprocess.Popen(FED + ["worker", "--share", str(share), "--name", name, "--serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def job(share: Path, inputs: Path, out: Path, name: str, chunk_rows: int | None) -> tuple[float, float]:
    """(seconds from submission to merged output, the command's wall time)."""
    started = time.perf_counter()
    extra = ["--chunk-rows", str(chunk_rows)] if chunk_rows else []
    done = subprocess.run(FED + ["infer", "--share", str(share), "--inputs", str(inputs), "--out", str(out),
                                 "--name", name, *extra], env=ENV, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"fedsync infer failed:\n{done.stdout}{done.stderr}")
    stamps = STAMP.findall(done.stdout)  # the first says "submitting job", the last "all N chunks done"
    first, last = (datetime.strptime(stamps[i][0], "%H:%M:%S.%f") for i in (0, -1))
    return (last - first).total_seconds(), wall


def wait_serving(share: Path, names: list[str], timeout: float = 120) -> None:
    s, end = Share(share), time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if all(s.read_record(WorkerInfo, s.worker_file(n)).serves for n in names):
                return
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        time.sleep(0.2)
    sys.exit(f"workers {names} did not register within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3, help="each figure is the median of this many, interleaved")
    ap.add_argument("--slowdown", type=float, default=4.0, help="how many times slower the slowed worker predicts")
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: fedsync's (32 chunks here)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        share, root = Path(tmp) / "share", Path(tmp)
        share.mkdir()
        trained(share)
        s = Share(share)
        final = s.read_record(FinalMarker, s.final_marker)
        model = get_task("digits").build_model("digits_cnn")
        model.load_state_dict(st_load(s.read_verified(s.final_model, final.model)))
        x = torch.rand(args.inputs, 1, 8, 8)
        save_file({"x": x}, str(root / "inputs.safetensors"))
        predict(model, x[:1024], 1024, "cpu")  # warm-up

        bares, pairs, jobs, walls, plans = [], [], [], [], []
        workers = [serving(share, "w1", 1), serving(share, "w2", 1)]
        try:
            wait_serving(share, ["w1", "w2"])
            for i in range(args.repeats):  # interleaved, so a noisy minute hurts both sides alike
                started = time.perf_counter()
                bare_logits = predict(model, x, 1024, "cpu")
                bares.append(time.perf_counter() - started)
                pairs.append(two_processes(share, root / "inputs.safetensors"))
                seconds, wall = job(share, root / "inputs.safetensors", root / f"equal{i}.csv", f"equal{i}",
                                    args.chunk_rows)
                jobs.append(seconds)
                walls.append(wall)
                plans.append(read_plan(s, f"equal{i}"))
        finally:
            for w in workers:
                w.terminate()
                w.wait(timeout=30)
        bare, pair, fed, wall = (statistics.median(v) for v in (bares, pairs, jobs, walls))
        merged = st_load((root / "equal0.safetensors").read_bytes())["logits"]
        same = int((merged.argmax(1) == bare_logits.argmax(1)).sum())
        print(f"{args.inputs} digits-shaped inputs, digits_cnn, this machine's {os.cpu_count()} cores; medians of "
              f"{args.repeats}, interleaved")
        print(f"bare in-process loop (torch threads {torch.get_num_threads()}, batch 1024): {bare:.2f} s, "
              f"{args.inputs / bare:,.0f} inputs/s (runs: {', '.join(f'{v:.2f}' for v in bares)})")
        print(f"the same loop in two processes of one thread each, half the inputs each (what any two workers on "
              f"these two cores could reach): {pair:.2f} s, {args.inputs / pair:,.0f} inputs/s = {bare / pair:.2f}x")
        print(f"fedsync infer, 2 serving CPU workers (1 thread each): {fed:.2f} s submission to merged output, "
              f"{args.inputs / fed:,.0f} inputs/s = {bare / fed:.2f}x the bare loop (goal >= 0.8x), "
              f"{pair / fed:.2f}x the two-process loop (runs: {', '.join(f'{v:.2f}' for v in jobs)}); command wall "
              f"time {wall:.2f} s ({bare / wall:.2f}x); chunks by worker {[chunks_by(p) for p in plans]}; "
              f"{same}/{args.inputs} predictions equal to the bare loop's")
        seconds, wall, plan = served(share, root, "slowed", args.slowdown, args.chunk_rows)
        print(f"one worker slowed {args.slowdown:g}x: {seconds:.2f} s, {args.inputs / seconds:,.0f} inputs/s; chunks "
              f"by worker {chunks_by(plan)} (w2 is the slowed one); {len(plan.problems) if plan else 0} duplicate or "
              "refused output(s)")


HALF = """
import sys, time
from safetensors.torch import load_file
from fedsync.learning.predict import predict
from fedsync.learning.tasks import get_task
from fedsync.storage.markers import FinalMarker
from fedsync.storage.share import Share
from safetensors.torch import load as st_load
share, inputs, part = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = Share(share)
model = get_task("digits").build_model("digits_cnn")
model.load_state_dict(st_load(s.read_verified(s.final_model, s.read_record(FinalMarker, s.final_marker).model)))
x = load_file(inputs)["x"]
x = x[: len(x) // 2] if part == 0 else x[len(x) // 2:]
predict(model, x[:1024], 1024, "cpu")
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
predict(model, x, 1024, "cpu")
print(time.perf_counter() - started, flush=True)
"""


def two_processes(share: Path, inputs: Path) -> float:
    """Seconds until both halves are predicted by two processes of one thread each, started together."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", HALF, str(share), str(inputs), str(i)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in (0, 1)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    for p in procs:
        p.communicate(timeout=600)
    return time.perf_counter() - started


def served(share: Path, root: Path, name: str, slowdown: float, chunk_rows: int | None
           ) -> tuple[float, float, JobPlan | None]:
    """Job `name` over the inputs with two fresh serving workers, w2 slowed `slowdown` times."""
    workers = [serving(share, "w1", 1), serving(share, "w2", slowdown)]
    try:
        wait_serving(share, ["w1", "w2"])
        seconds, wall = job(share, root / "inputs.safetensors", root / f"{name}.csv", name, chunk_rows)
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=30)
    return seconds, wall, read_plan(Share(share), name)


def chunks_by(plan: JobPlan | None) -> dict[str, int]:
    return {w: len(c) for w, c in plan.accepted.items()} if plan else {}

if __name__ == "__main__":
    main()
