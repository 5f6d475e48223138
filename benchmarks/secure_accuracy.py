"""Digits accuracy with secure aggregation against plain FedAvg: a real coordinator and real workers (separate
processes) for 20 rounds, the same seeds, the same clip_norm (5), and the plain run's screens turned off as secure
aggregation turns them off, so the one difference is the protocol (its masks and its 32-bit encoding).

Usage: python benchmarks/secure_accuracy.py [ROUNDS] [WORKERS]   (default 20 rounds, 5 workers)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync.storage.markers import FinalMarker  # noqa: E402
from fedsync.storage.share import Share  # noqa: E402

FEDSYNC = [sys.executable, "-m", "fedsync"]
SAME = ["--set", "clip_norm=5", "--set", "screen_factor=0", "--set", "screen_max_ratio=0", "--set", "clip_factor=0",
        "--set", "screen_direction=false", "--set", "min_updates=2", "--set", "confidential_updates=false"]


def run(rounds: int, workers: int, secure: bool) -> tuple[float, float]:
    """(final test accuracy, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        env = {**os.environ, "FEDSYNC_KEY_DIR": str(Path(tmp) / "keys"), "OMP_NUM_THREADS": "1"}
        started = time.monotonic()
        coord = subprocess.Popen(FEDSYNC + ["coordinator", "--share", str(share), "--rounds", str(rounds),
                                            "--set", f"min_workers={workers}", *SAME,
                                            "--set", f"secure_aggregation={str(secure).lower()}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs = [subprocess.Popen(FEDSYNC + ["worker", "--share", str(share), "--name", f"w{i}", "--device", "cpu",
                                             "--wait-for-run", "60"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(workers)]
        _, err = coord.communicate(timeout=1800)
        for p in procs:
            p.wait(timeout=120)
        if coord.returncode != 0:
            raise SystemExit(f"the coordinator exited {coord.returncode}: {err[-2000:]}")
        s = Share(share)
        return s.read_record(FinalMarker, s.final_marker).test_accuracy, time.monotonic() - started


def main(rounds: int, workers: int) -> None:
    plain, plain_s = run(rounds, workers, secure=False)
    secure, secure_s = run(rounds, workers, secure=True)
    print(f"digits, {workers} workers, {rounds} rounds, clip_norm 5: plain FedAvg {plain:.4f} ({plain_s:.0f} s), "
          f"secure aggregation {secure:.4f} ({secure_s:.0f} s): {100 * (secure - plain):+.2f} points "
          f"(goal within 0.5), {secure_s / plain_s:.2f}x the wall time")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, int(sys.argv[2]) if len(sys.argv) > 2 else 5)
