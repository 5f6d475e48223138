"""A real coordinator process against 10, 100 and 1,000 simulated workers on a local share: what a round costs the
coordinator as the workers grow.

The workers are one process of threads that do what a worker's files say (docs/PROTOCOL.md sections 5.3, 5.5, 7):
each registers with its own Ed25519 key, heartbeats every HEARTBEAT s, and answers each assignment with a valid
signed update (the same small random delta for all: its bytes are serialised and hashed once, then written whole
under each worker's name). They train nothing, so what is measured is the coordinator: from the last marker
written to the round's summary (listing, checking markers and signatures, reading, hashing and adding updates,
aggregating, writing), its CPU seconds and peak memory, and the round's own timings from summary.yaml.

The model is one of the digits task's: digits_cnn (0.15 M parameters, a 608 KB update) or digits_mlp (1.13 M
parameters, 4.5 MB). `--spread S` has the workers' updates arrive spread evenly over S seconds, as workers that
finish training at different times do; with 0 (the default) they all arrive as fast as one process can write them,
and the time after the last marker is then mostly the backlog the coordinator has not read yet.

Usage: python benchmarks/scale_workers.py [--model M] [--spread S] [ROUNDS] [N ...]
       (default digits_cnn, spread 0, 3 rounds; 10 100 1000 workers)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync import __version__  # noqa: E402
from fedsync.learning.models import build_model  # noqa: E402
from fedsync.storage.hashing import hash_bytes  # noqa: E402
from fedsync.storage.keys import Identity, load_identity  # noqa: E402
from fedsync.storage.markers import (  # noqa: E402
    FORMAT_VERSION,
    Assignment,
    FileRef,
    Summary,
    UpdateMarker,
    WorkerInfo,
    parse,
    to_dict,
)
from fedsync.storage.share import Share  # noqa: E402
from fedsync.storage.signing import update_message  # noqa: E402
from fedsync.tensors.files import state_bytes  # noqa: E402

FEDSYNC = [sys.executable, "-m", "fedsync"]
HEARTBEAT = 5.0


class Fleet:
    """N simulated workers answering every round of one run."""

    def __init__(self, share: Share, n: int, keys: Path, model: str, spread: float) -> None:
        self.share, self.stop = share, threading.Event()
        self.ids: dict[str, Identity] = {f"w{i:04d}": load_identity(keys / f"w{i:04d}.pem")[0] for i in range(n)}
        self.beat = 0
        delta = {k: (torch.randn(v.shape) * 1e-3).to(v.dtype) if v.is_floating_point() else torch.zeros_like(v)
                 for k, v in build_model(model, 10).state_dict().items()}
        self.gap = spread / n  # seconds between two workers' updates
        self.update = state_bytes(delta)
        self.ref = hash_bytes(self.update)
        self.last_marker: dict[int, float] = {}  # round -> when its last marker was written (monotonic)

    def register(self) -> None:
        self.beat += 1
        for name, ident in self.ids.items():
            self.share.write_yaml(self.share.worker_file(name), to_dict(WorkerInfo(
                format=FORMAT_VERSION, name=name, host="fleet", fedsync=__version__, torch=str(torch.__version__),
                device="cpu", device_name="CPU", cuda_capability=None, state="idle", round=None,
                heartbeat=self.beat, public_key=ident.public)))

    def heartbeats(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            self.register()

    def answer(self, rounds: int) -> None:
        for r in range(1, rounds + 1):
            while not self.share.exists(self.share.assignment(r)):
                if self.stop.wait(0.02):
                    return
            a = parse(Assignment, self.share.read_yaml(self.share.assignment(r)), "assignment")
            for i, name in enumerate(sorted(a.workers)):
                if i and self.gap and self.stop.wait(self.gap):
                    return
                tensors = self.share.update_tensors(r, name)
                self.share.write(tensors, self.update)
                m = UpdateMarker(format=FORMAT_VERSION, round=r, worker=name, base=a.model.blake3,
                                 tensors=FileRef(f"{name}.safetensors", self.ref, len(self.update)), samples=1,
                                 steps=1, train_loss=1.0, seconds=0.1, device="cpu")
                m.signature = self.ids[name].sign(update_message(a.run_id, m))
                self.share.write_yaml(self.share.update_marker(r, name), to_dict(m))
            self.last_marker[r] = time.monotonic()


def _proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and peak resident memory (bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak


def measure(n: int, rounds: int, model: str, spread: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        share = Share(t / "share")
        (t / "share").mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDSYNC_KEY_DIR": str(t / "coordinator-keys")}
        coord = subprocess.Popen(FEDSYNC + ["coordinator", "--share", str(share.root), "--rounds", str(rounds),
                                            "--set", f"min_workers={n}", "--set", "worker_timeout=600",
                                            "--set", "round_timeout=600", "--set", f"eval_every={rounds}",
                                            "--set", "eval_samples=64", "--set", f"model={model}",
                                            "--set", "keep_rounds=3"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not share.exists(share.manifest):
            if coord.poll() is not None:
                raise SystemExit(f"the coordinator with {n} workers exited {coord.returncode} before the run began")
            time.sleep(0.05)
        fleet = Fleet(share, n, t / "worker-keys", model, spread)
        fleet.register()
        beating = threading.Thread(target=fleet.heartbeats, daemon=True)
        beating.start()
        closed: dict[int, float] = {}
        answering = threading.Thread(target=fleet.answer, args=(rounds,), daemon=True)
        answering.start()
        cpu, peak = 0.0, 0
        while coord.poll() is None:
            for r in range(1, rounds + 1):
                if r not in closed and share.exists(share.summary(r)):
                    closed[r] = time.monotonic()
            try:
                cpu, peak = _proc_stats(coord.pid)
            except (StopIteration, OSError, IndexError):  # it has just exited: the last reading stands
                pass
            time.sleep(0.01)
        fleet.stop.set()
        if coord.returncode != 0:
            raise SystemExit(f"the coordinator with {n} workers exited {coord.returncode}")
        for r in range(1, rounds + 1):
            closed.setdefault(r, time.monotonic())
        summaries = [parse(Summary, share.read_yaml(share.summary(r)), "s") for r in range(1, rounds + 1)]
        latency = [closed[r] - fleet.last_marker[r] for r in range(2, rounds + 1)]
        return {"latency": statistics.median(latency),
                "intake": statistics.median(s.timings["final_intake_s"] for s in summaries[1:]),
                "aggregate": statistics.median(s.timings["aggregate_s"] for s in summaries[1:]),
                "accepted": min(len(s.accepted) for s in summaries), "cpu": cpu, "peak": peak / 2**20}


def main(rounds: int, sizes: list[int], model: str, spread: float) -> None:
    print(f"model {model}, updates spread over {spread:g} s, {rounds} rounds")
    print("| workers | last marker to summary (median, rounds 2..) | final intake | aggregate | accepted | "
          "coordinator CPU s (whole run) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        m = measure(n, rounds, model, spread)
        print(f"| {n} | {m['latency']:.2f} s | {m['intake']:.2f} s | {m['aggregate']:.3f} s | {m['accepted']:.0f} | "
              f"{m['cpu']:.1f} | {m['peak']:.0f} |", flush=True)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="A real coordinator against N simulated workers.")
    cli.add_argument("--model", default="digits_cnn", choices=["digits_cnn", "digits_mlp"])
    cli.add_argument("--spread", type=float, default=0.0, help="seconds over which a round's updates arrive")
    cli.add_argument("rounds", type=int, nargs="?", default=3)
    cli.add_argument("sizes", type=int, nargs="*", default=[10, 100, 1000])
    args = cli.parse_args()
    main(args.rounds, args.sizes, args.model, args.spread)
