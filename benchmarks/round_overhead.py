"""Round overhead on a local share: from the quorum-completing marker appearing to the next round's
assignment appearing, minus the coordinator's own reading of that update, aggregation and evaluation
(taken from each round's summary.yaml timings). A real `fedsync coordinator` process runs the rounds; this
script plays two workers, writing real updates and markers through fedsync's share code.
Usage: python benchmarks/round_overhead.py [ROUNDS]
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsync import __version__
from fedsync.storage.keys import load_identity, worker_key_path
from fedsync.storage.markers import FORMAT_VERSION, Assignment, Summary, UpdateMarker, WorkerInfo, parse, to_dict
from fedsync.storage.share import Share
from fedsync.storage.signing import update_message
from fedsync.tensors.files import load_verified, save_state

WORKERS = ("bench-a", "bench-b")


def wait_for(path: Path, timeout: float = 30.0) -> float:
    """Spin (0.2 ms naps) until path exists; return the time it was seen."""
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.0002)
    return time.perf_counter()


def register(share: Share, name: str, beat: int) -> None:
    share.write_yaml(share.worker_file(name), to_dict(WorkerInfo(
        format=FORMAT_VERSION, name=name, host=socket.gethostname(), fedsync=__version__, torch=str(torch.__version__),
        device="cpu", device_name="CPU", cuda_capability=None, state="idle", round=None, heartbeat=beat,
        public_key=load_identity(worker_key_path(name))[0].public)))


def main(rounds: int = 30) -> None:
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as keys:
        os.environ["FEDSYNC_KEY_DIR"] = keys  # this process signs as the workers; the coordinator signs too
        share = Share(Path(tmp))
        coord = subprocess.Popen([sys.executable, "-m", "fedsync", "coordinator", "--share", tmp, "--rounds",
                                  str(rounds), "--set", "min_workers=2"], stdout=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(share.path(share.manifest))
            overheads, raw, works = [], [], []
            for r in range(1, rounds + 1):
                for name in WORKERS:
                    register(share, name, r)  # a heartbeat per round keeps both live
                wait_for(share.path(share.assignment(r)))
                a = parse(Assignment, share.read_yaml(share.assignment(r)), "assignment")
                base = load_verified(share, share.global_model(r), a.model)
                for i, name in enumerate(WORKERS):
                    update = {k: (torch.randn(v.shape) * 1e-3).to(v.dtype) if v.is_floating_point()
                              else torch.zeros_like(v) for k, v in base.items()}
                    ref = save_state(share.write, share.update_tensors(r, name), update)
                    marker = UpdateMarker(format=FORMAT_VERSION, round=r, worker=name, base=a.model.blake3,
                                          tensors=ref, samples=100, steps=1, train_loss=1.0, seconds=0.0, device="cpu")
                    marker.signature = load_identity(worker_key_path(name))[0].sign(update_message(a.run_id, marker))
                    share.write_yaml(share.update_marker(r, name), to_dict(marker))
                    if i == 0:
                        time.sleep(0.05)  # the first update is taken in before the quorum-completing one
                t0 = time.perf_counter()
                t1 = wait_for(share.path(share.summary(r) if r == rounds else share.assignment(r + 1)))
                s = parse(Summary, share.read_yaml(share.summary(r)), "summary")
                work = s.timings["final_intake_s"] + s.timings["aggregate_s"] + s.timings["evaluate_s"]
                raw.append((t1 - t0) * 1000)
                works.append(work * 1000)
                if r < rounds:
                    overheads.append((t1 - t0 - work) * 1000)
        finally:
            coord.wait(timeout=60)
    print(f"round overhead over {len(overheads)} rounds (digits model, 2 workers, local share, inotify):")
    print(f"  marker -> next assignment, total: median {statistics.median(raw):.1f} ms, of which intake, "
          f"aggregation and evaluation (the baseline) median {statistics.median(works):.1f} ms")
    print(f"  minus intake of the last update, aggregation and evaluation: median "
          f"{statistics.median(overheads):.1f} ms, p90 {sorted(overheads)[int(0.9 * len(overheads))]:.1f} ms "
          f"(goal: median <= 50 ms); overhead / total = {statistics.median(overheads) / statistics.median(raw):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
