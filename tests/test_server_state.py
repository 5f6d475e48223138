"""A server optimizer's state lives in the share: a coordinator killed while writing it, while writing the summary
that names it, or just after, and started again, ends with the very same model as a run never interrupted, given
the same updates. Late updates move the model but stay out of the state (the intake keeps them apart)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.optimizers import ServerSettings, make_optimizer
from fedsync.aggregation.rules import FedAvg
from fedsync.aggregation.sums import WeightedSum
from fedsync.fedavg import mean_delta
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import Assignment, Summary, parse
from fedsync.storage.share import Share
from fedsync.tensors.files import layout_of, load_verified, save_state

from .helpers import finish, killed_on_error, register_worker, start, submit_update, wait_until

ROUNDS = 3
WORKERS = ("a", "b")
FAULTS = ["write:0002/server_state.safetensors", "coordinator:after-summary:2"]


def _delta(s: Share, a: Assignment, worker: str) -> dict[str, torch.Tensor]:
    """The same update for the same round and worker in every run."""
    g = torch.Generator().manual_seed(a.round * 10 + WORKERS.index(worker))
    base = load_verified(s, s.global_model(a.round), a.model)
    return {k: (torch.randn(v.shape, generator=g) * 1e-2).to(v.dtype) if v.is_floating_point()
            else torch.zeros_like(v) for k, v in sorted(base.items())}  # st_load returns them in any order


def _feed(s: Share, proc: subprocess.Popen[str], fed: set[int]) -> None:
    """Submit both workers' updates to every round that opens, until the coordinator exits (done or killed)."""
    while proc.poll() is None:
        for r in s.rounds():
            if r not in fed and s.exists(s.assignment(r)):
                a = parse(Assignment, s.read_yaml(s.assignment(r)), "a")
                for w in WORKERS:
                    submit_update(s, a, w, _delta(s, a, w), samples=100 + 50 * WORKERS.index(w))
                fed.add(r)
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass


def _coordinator(share: Path, fault: str | None = None) -> subprocess.Popen[str]:
    return start("coordinator", "--share", str(share), "--rounds", str(ROUNDS), "--set", "min_workers=2",
                 "--set", "server_optimizer=nesterov", "--set", "worker_timeout=300", "--set", "eval_samples=64",
                 fault=fault)


def _run(share: Path, faults: list[str]) -> Share:
    s = Share(share)
    for w in WORKERS:
        register_worker(s, w)
    fed: set[int] = set()
    for fault in [*faults, None]:
        proc = _coordinator(share, fault)
        with killed_on_error(proc):
            _feed(s, proc, fed)
            out = finish(proc, timeout=120)
        assert proc.returncode == (-9 if fault else 0), (fault, out)
    return s


@pytest.mark.processes
def test_a_killed_and_restarted_coordinator_ends_with_the_uninterrupted_model(tmp_path: Path) -> None:
    (tmp_path / "calm").mkdir()
    (tmp_path / "killed").mkdir()
    calm = _run(tmp_path / "calm", [])
    killed = _run(tmp_path / "killed", FAULTS)
    for s in (calm, killed):
        last = parse(Summary, s.read_yaml(s.summary(ROUNDS)), "s")
        assert last.server_optimizer == "nesterov" and last.server_state is not None
        state = load_verified(s, s.server_state(ROUNDS), last.server_state)
        assert state and all(k.startswith("m/") for k in state)
    assert calm.path(calm.final_model).read_bytes() == killed.path(killed.final_model).read_bytes()
    for r in range(1, ROUNDS + 1):
        assert calm.path(calm.server_state(r)).read_bytes() == killed.path(killed.server_state(r)).read_bytes(), r
    assert not [p for p in killed.root.rglob("*.tmp")]


def test_the_intake_keeps_late_updates_apart_for_the_optimizer(tmp_path: Path) -> None:
    base = {"w": torch.zeros(40), "n": torch.tensor(0)}
    updates = {("on", 2): torch.randn(40), ("on2", 2): torch.randn(40), ("late", 1): torch.randn(40)}
    agg = Aggregator(layout_of(base), LocalStore(tmp_path), round=2)
    try:
        candidates = []
        for (name, r), w in updates.items():
            ref = save_state(LocalStore(tmp_path).write, f"{name}.safetensors", {"w": w, "n": torch.tensor(1)})
            candidates.append(Candidate(name, f"{name}.safetensors", ref, 10.0, round=r))
        assert all(o.problem is None for o in agg.take(candidates)) and agg.has_late
        every, on_time = WeightedSum(layout_of(base)), WeightedSum(layout_of(base))
        for (name, r), w in updates.items():
            every.add({"w": w, "n": torch.tensor(1)}, 10.0)
            if r == 2:
                on_time.add({"w": w, "n": torch.tensor(1)}, 10.0)
        expected = {True: mean_delta(every)["w"], False: mean_delta(on_time)["w"]}
        for late in (True, False, True):  # collecting does not use the sums up: again gives the same
            got = FedAvg().aggregate(agg.collected(frozenset({"w"}), late=late)).delta
            torch.testing.assert_close(got["w"], expected[late])
    finally:
        agg.close()


@pytest.mark.processes
def test_a_late_update_moves_the_model_but_not_the_momentum(share: Path) -> None:
    """Round 1 closes on a quorum of a and b; c's round-1 update arrives while round 2 is open and is folded into it.
    The new model is Nesterov's step from the whole aggregate, the momentum it keeps the on-time aggregate's."""
    s = Share(share)
    for w in (*WORKERS, "c"):
        register_worker(s, w)
    proc = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "min_workers=3", "--set", "quorum=2",
                 "--set", "server_optimizer=nesterov", "--set", "late_policy=fold", "--set", "worker_timeout=300",
                 "--set", "eval_samples=64", "--set", "clip_factor=0", "--set", "screen_direction=false")
    with killed_on_error(proc):
        wait_until(lambda: s.exists(s.assignment(1)), 60, "round 1")
        a1 = parse(Assignment, s.read_yaml(s.assignment(1)), "a1")
        for w in WORKERS:
            submit_update(s, a1, w, _delta(s, a1, w), samples=100)
        wait_until(lambda: s.exists(s.assignment(2)), 60, "round 2")
        late = {k: v * 3 for k, v in _delta(s, a1, "b").items()}
        submit_update(s, a1, "c", late, samples=200)
        time.sleep(2.0)  # the coordinator takes the late update in (on its file event) before the round's own arrive
        a2 = parse(Assignment, s.read_yaml(s.assignment(2)), "a2")
        own = {w: _delta(s, a2, w) for w in WORKERS}
        for w in WORKERS:
            submit_update(s, a2, w, own[w], samples=100)
        out = finish(proc, timeout=120)
    assert proc.returncode == 0, out
    s2 = parse(Summary, s.read_yaml(s.summary(2)), "s2")
    assert [(x.worker, x.outcome) for x in s2.late] == [("c", "folded")], s2.late
    s1 = parse(Summary, s.read_yaml(s.summary(1)), "s1")
    base = load_verified(s, s.global_model(2), a2.model)
    before = load_verified(s, s.server_state(1), s1.server_state)
    weight = 200 * 2 ** -0.5
    on_time = {k: (own["a"][k].double() + own["b"][k].double()) / 2 for k in base}
    whole = {k: (100 * own["a"][k].double() + 100 * own["b"][k].double() + weight * late[k].double())
             / (200 + weight) for k in base}
    parameters = frozenset(k.removeprefix("m/") for k in before)
    opt = make_optimizer(ServerSettings("nesterov"), parameters)
    want_model, want_state = opt.step(base, {k: v.float() for k, v in whole.items()}, before,
                                      {k: v.float() for k, v in on_time.items()})
    got_model = load_verified(s, s.final_model, s2.model)
    got_state = load_verified(s, s.server_state(2), s2.server_state)
    for k in parameters:
        torch.testing.assert_close(got_model[k], want_model[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_state[f"m/{k}"], want_state[f"m/{k}"], rtol=1e-5, atol=1e-6)
    carried_late = opt.step(base, {k: v.float() for k, v in whole.items()}, before)[1]
    assert any(not torch.allclose(got_state[k], carried_late[k]) for k in got_state)
