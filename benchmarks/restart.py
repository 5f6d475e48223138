"""Coordinator restart-to-resumed time: a coordinator is SIGKILLed while collecting round 2 (through the
FEDSYNC_FAULT crash point), then started again with the same command while its two workers keep running.
Prints the time from the restart to round 2 closing, beside a fresh coordinator's time from start to its
first round opening in the same run (the start-up floor: Python, torch and the dataset).
Usage: python benchmarks/restart.py [REPEATS]
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsync.storage.share import Share

FEDSYNC = [sys.executable, "-m", "fedsync"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for(path: Path, timeout: float = 120) -> float:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.005)
    return time.monotonic()


def once() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        s = Share(Path(tmp))
        coord_args = FEDSYNC + ["coordinator", "--share", tmp, "--rounds", "3", "--set", "min_workers=2"]
        started = time.monotonic()
        doomed = subprocess.Popen(coord_args, env={**ENV, "FEDSYNC_FAULT": "coordinator:collecting:2"},
                                  stdout=subprocess.DEVNULL)
        workers = [subprocess.Popen(FEDSYNC + ["worker", "--share", tmp, "--name", f"w{i}", "--device", "cpu"],
                                    env=ENV, stdout=subprocess.DEVNULL) for i in (1, 2)]
        fresh = wait_for(s.path(s.assignment(1))) - started  # includes waiting for the workers' own start-up
        if doomed.wait(timeout=120) != -signal.SIGKILL:
            raise SystemExit(f"the coordinator exited with {doomed.returncode} instead of dying at its crash point "
                             "coordinator:collecting:2: this run measures no restart")
        restarted = time.monotonic()
        coord = subprocess.Popen(coord_args, env=ENV, stdout=subprocess.DEVNULL)
        resumed = wait_for(s.path(s.summary(2))) - restarted
        procs = [coord, *workers]
        if [p.wait(timeout=120) for p in procs] != [0] * len(procs):
            raise SystemExit("the restarted run did not finish cleanly")
        return fresh, resumed


def main(repeats: int = 3) -> None:
    runs = [once() for _ in range(repeats)]
    fresh = statistics.median(r[0] for r in runs)
    resumed = statistics.median(r[1] for r in runs)
    print(f"coordinator restart after SIGKILL mid-round, {repeats} runs (digits, 2 workers, local share):")
    print(f"  restart -> the interrupted round closed: median {resumed:.2f} s "
          f"(runs {', '.join(f'{r[1]:.2f}' for r in runs)})")
    print(f"  baseline, fresh run start -> round 1 open (workers starting too): median {fresh:.2f} s "
          f"-> ratio {resumed / fresh:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
