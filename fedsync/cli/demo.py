"""`fedsync demo`: a coordinator and local workers as separate processes over a local share folder."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from fedsync.base.errors import FedsyncError, ShareError
from fedsync.base.logs import NO_PROGRESS, Log
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
    share.remove(names.SHARDS)
    for name in sorted(names.COORDINATOR_ROOT_FILES - {names.MANIFEST}) + [names.MANIFEST]:  # fedsync.yaml last
        share.remove(name)


def run_demo(share: Share, workers: int, rounds: int, config_name: str, log: Log) -> DemoResult:
    share.store.make_folder("")  # the demo's own local folder (./rounds by default), made when absent
    clear_demo_run(share)
    overrides = {"min_workers": workers}
    identity, _ = load_identity(coordinator_key_path())  # the coordinator started below signs with this key
    open_run(share, load_config(config_name, overrides), "demo", identity)
    started = time.monotonic()
    log(f"starting a coordinator and {workers} worker processes on {share.where()} ({config_name}, {rounds} rounds)")
    roles = [["coordinator", "--share", share.where(), "--rounds", str(rounds), "--config", config_name,
              "--set", f"min_workers={workers}"]]
    roles += [["worker", "--share", share.where(), "--name", f"demo-worker-{i}", "--device", "cpu",
               "--wait-for-run", "60"] for i in range(1, workers + 1)]
    procs = _start(roles, log)
    try:
        _supervise(procs, started)
    finally:
        for _, p in procs:
            if p.is_alive():
                p.terminate()
        for _, p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    seconds = time.monotonic() - started
    final = share.read_record(FinalMarker, share.final_marker)
    return DemoResult(final, seconds)


def _start(roles: list[list[str]], log: Log) -> list[tuple[list[str], BaseProcess]]:
    """One real process per role. On Linux they are forked from this one after it imported torch and fedsync's
    roles once (about 2.5 s), instead of four interpreters importing torch side by side on a small machine (about
    8 s on two cores); elsewhere, where forking a process that loaded torch is not safe, they are spawned fresh."""
    if sys.platform.startswith("linux"):
        import fedsync.coordinator  # noqa: F401 - imported once here, inherited by every forked process
        import fedsync.worker  # noqa: F401
        context = multiprocessing.get_context("fork")
    else:
        log("each process loads torch first, which takes a few seconds")
        context = multiprocessing.get_context("spawn")
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread each: the processes already share the machine's cores
    os.environ[NO_PROGRESS] = "1"  # they share one terminal too: event lines only, no progress line each
    sys.stdout.flush()
    sys.stderr.flush()
    procs = []
    for args in roles:
        p = context.Process(target=_fedsync, args=(args,), name=f"fedsync {args[0]}")
        p.start()
        procs.append((args, p))
    return procs


def _fedsync(args: list[str]) -> None:
    """A process of the demo: the same as `python -m fedsync ARGS` on the command line."""
    import torch

    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.argv = ["fedsync", *args]
    runpy.run_module("fedsync", run_name="__main__", alter_sys=True)


def _supervise(procs: list[tuple[list[str], BaseProcess]], started: float) -> None:
    """Wait until every process has exited 0; stop at the first failure or at the time limit."""
    while True:
        codes = [p.exitcode for _, p in procs]
        for (args, _), code in zip(procs, codes):
            if code not in (None, 0):
                raise FedsyncError(f"demo process `fedsync {' '.join(args[:4])}` exited with "
                                   f"status {code}; the others were stopped")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() - started > DEMO_TIMEOUT_S:
            raise FedsyncError(f"the demo did not finish within {DEMO_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
