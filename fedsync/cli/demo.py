"""`fedsync demo`: a coordinator and local workers as separate processes over a local share folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedsync.base.errors import FedsyncError, ShareError
from fedsync.base.logs import Log
from fedsync.run.config import load_config
from fedsync.run.start import open_run
from fedsync.storage import names
from fedsync.storage.keys import coordinator_key_path, load_identity
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import FinalMarker
from fedsync.storage.share import Share

DEMO_TIMEOUT_S = 900.0


@dataclass
class DemoResult:
    final: FinalMarker
    seconds: float


def clear_demo_run(share: Share) -> None:
    """Remove a previous demo run's files (and only the protocol's files); refuse to touch any other run."""
    if not share.exists(share.manifest):
        if share.rounds():
            raise ShareError(f"{share.where()} holds round folders but no fedsync.yaml; the demo will not touch it: "
                             "use --share with another folder")
        return
    manifest = read_manifest(share)
    if manifest.created_by != "demo":
        raise ShareError(f"{share.where()} holds run {manifest.run_id}, started by `fedsync {manifest.created_by}`; "
                         "the demo replaces only its own runs: use --share with another folder")
    for r in share.rounds():
        share.remove(share.round_dir(r))
    share.remove(share.workers_dir)
    for name in sorted(names.COORDINATOR_ROOT_FILES - {names.MANIFEST}) + [names.MANIFEST]:  # fedsync.yaml last
        share.remove(name)


def run_demo(share_root: Path, workers: int, rounds: int, config_name: str, log: Log) -> DemoResult:
    share = Share(share_root)
    clear_demo_run(share)
    overrides = {"min_workers": workers}
    identity, _ = load_identity(coordinator_key_path())  # the coordinator started below signs with this key
    open_run(share, load_config(config_name, overrides), "demo", identity.public)
    base = [sys.executable, "-m", "fedsync"]
    # One torch thread per worker: the workers already run side by side on the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    log(f"starting a coordinator and {workers} worker processes on {share.where()} ({config_name}, {rounds} rounds); "
        "each loads torch first, which takes a few seconds")
    procs = [subprocess.Popen(base + ["coordinator", "--share", str(share_root), "--rounds", str(rounds),
                                      "--config", config_name, "--set", f"min_workers={workers}"], env=env)]
    procs += [subprocess.Popen(base + ["worker", "--share", str(share_root), "--name", f"demo-worker-{i}",
                                       "--device", "cpu", "--wait-for-run", "60"], env=env)
              for i in range(1, workers + 1)]
    try:
        _supervise(procs, started)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    seconds = time.monotonic() - started
    final = share.read_record(FinalMarker, share.final_marker)
    return DemoResult(final, seconds)


def _supervise(procs: list[subprocess.Popen[bytes]], started: float) -> None:
    """Wait until every process has exited 0; stop at the first failure or at the time limit."""
    while True:
        codes = [p.poll() for p in procs]
        for p, code in zip(procs, codes):
            if code not in (None, 0):
                raise FedsyncError(f"demo process `fedsync {' '.join(map(str, p.args[3:7]))}` exited with "
                                   f"status {code}; the others were stopped")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() - started > DEMO_TIMEOUT_S:
            raise FedsyncError(f"the demo did not finish within {DEMO_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
