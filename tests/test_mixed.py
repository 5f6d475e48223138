"""Mixed hardware through real processes: a worker whose GPU the torch build cannot drive falls back to the
CPU and says so in the share, and throughput balancing gives a 4x slower worker a quarter of the steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsync.storage.markers import Assignment, Evaluation, Summary, UpdateMarker, WorkerInfo, parse
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, run, start
from .test_device import CU130, GTX1080, as_env, facts

ROUNDS = 4


@pytest.mark.processes
def test_throughput_balance_and_a_pascal_worker_falling_back(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", str(ROUNDS), "--set", "min_workers=2",
                  "--set", "balance=throughput", "--set", "prox_mu=0.01",
                  "--set", "local_epochs=4")
    fast = start("worker", "--share", str(share), "--name", "fast", "--device", "cpu", "--wait-for-run", "60")
    slow = start("worker", "--share", str(share), "--name", "slow", "--device", "auto", "--wait-for-run", "60",
                 env={**as_env(facts(CU130, GTX1080)), "FEDSYNC_SLOWDOWN": "4"})
    with killed_on_error(coord, fast, slow):
        out = finish(coord, timeout=240)
        outs = [finish(w, timeout=30) for w in (fast, slow)]
    assert coord.returncode == 0, out
    assert fast.returncode == 0 and slow.returncode == 0, outs

    s = Share(share)
    info = parse(WorkerInfo, s.read_yaml(s.worker_file("slow")), "slow")
    assert info.device == "cpu" and info.device_fallback and "GTX 1080" in info.device_fallback
    assert "WARNING" in outs[1] and "WARNING: worker slow trains on the CPU" in out
    status = run("status", "--share", str(share))
    assert "WARNING: on the CPU although a GPU is present" in status.stdout
    workers = {w["name"]: w for w in json.loads(run("status", "--share", str(share), "--json").stdout)["workers"]}
    assert workers["fast"]["samples_per_s"] > 2 * workers["slow"]["samples_per_s"] > 0

    balanced = 0
    for r in range(1, ROUNDS + 1):
        a = parse(Assignment, s.read_yaml(s.assignment(r)), "a")
        summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
        assert sorted(x.worker for x in summary.accepted) == ["fast", "slow"] and summary.aggregation == "fedavg"
        for x in summary.accepted:
            m = parse(UpdateMarker, s.read_yaml(s.update_marker(r, x.worker)), "m")
            assert x.steps == m.steps and x.samples == m.samples
            if a.workers[x.worker].local_steps is not None:
                assert m.steps == a.workers[x.worker].local_steps
        fast_steps, slow_steps = (a.workers[w].local_steps for w in ("fast", "slow"))
        if fast_steps is not None and slow_steps is not None:
            balanced += 1
            assert fast_steps > 2 * slow_steps, (r, fast_steps, slow_steps)
            assert summary.step_scale == 1.0
    assert balanced == ROUNDS, "every round was sized by the speeds published at registration"
    assert parse(Evaluation, s.read_yaml(s.evaluation(ROUNDS)), "e").test_accuracy >= 0.85
