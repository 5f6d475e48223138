"""Run-level behaviour with real processes: joining late, deadlines, foreign files, continuing, versions."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedsync.storage.keys import load_identity
from fedsync.storage.lease import read_lease
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    Evaluation,
    FileRef,
    FinalMarker,
    Summary,
    UpdateMarker,
    WorkerTask,
    parse,
    to_dict,
)
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message
from fedsync.tensors.files import load_verified, save_state

from .helpers import (
    finish,
    killed_on_error,
    read_yaml,
    register_worker,
    run,
    start,
    submit_update,
    wait_until,
    write_yaml,
)


def summary(share: Share, r: int) -> Summary:
    return parse(Summary, share.read_yaml(share.summary(r)), "summary")


@pytest.mark.processes
def test_late_worker_joins_next_round_and_foreign_files_are_reported(share: Path) -> None:
    s = Share(share)
    coord = start("coordinator", "--share", str(share), "--rounds", "3")
    w1 = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    w2 = None
    try:
        wait_until(lambda: s.exists(s.summary(1)), 90, "round 1 to close")
        os.kill(w1.pid, signal.SIGSTOP)  # hold round 2 open while the second worker arrives
        wait_until(lambda: s.exists(s.assignment(2)), 30, "round 2 to open")
        w2 = start("worker", "--share", str(share), "--name", "w2", "--device", "cpu", "--wait-for-run", "60")
        wait_until(lambda: s.exists(s.worker_file("w2")), 60, "w2 to register")
        updates = s.path(s.updates_dir(2))
        a = parse(Assignment, s.read_yaml(s.assignment(2)), "a")
        ref = FileRef("intruder.safetensors", "00" * 32, 3)
        (updates / "intruder.safetensors").write_bytes(b"abc")
        write_yaml(updates / "intruder.yaml", to_dict(UpdateMarker(
            format=FORMAT_VERSION, round=2, worker="intruder", base=a.model.blake3, tensors=ref, samples=10, steps=1,
            train_loss=0.1, seconds=1.0, device="cpu")))
        (updates / "w1.sync-conflict-20261123-101010-ABCDEFG.yaml").write_text("format: 1\n")
        (updates / "notes.txt").write_text("hello")
    finally:
        os.kill(w1.pid, signal.SIGCONT)
    out = finish(coord, timeout=120)
    outs = [finish(w1, timeout=30)] + ([finish(w2, timeout=30)] if w2 else [])
    assert coord.returncode == 0, out + "".join(outs)

    assert list(parse(Assignment, s.read_yaml(s.assignment(2)), "a").workers) == ["w1"]
    assert sorted(parse(Assignment, s.read_yaml(s.assignment(3)), "a").workers) == ["w1", "w2"]
    s2 = summary(s, 2)
    assert [(x.worker, x.reason) for x in s2.rejected] == [("intruder", "not_assigned")]
    assert s2.ignored == ["updates/notes.txt", "updates/w1.sync-conflict-20261123-101010-ABCDEFG.yaml"]
    assert [x.worker for x in s2.accepted] == ["w1"]
    assert sorted(x.worker for x in summary(s, 3).accepted) == ["w1", "w2"]


@pytest.mark.processes
def test_deadline_closes_a_round_with_a_silent_worker(share: Path) -> None:
    s = Share(share)
    register_worker(s, "ghost")  # registered, then silent: counts as live at first, never submits
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", "min_workers=2",
                  "--set", "round_timeout=4")
    w1 = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    out = finish(coord, timeout=120)
    finish(w1, timeout=30)
    assert coord.returncode == 0, out
    s1 = summary(s, 1)
    assert s1.closed_because == "deadline" and 4 <= s1.seconds < 30
    assert [x.worker for x in s1.accepted] == ["w1"] and s1.missing == ["ghost"]


@pytest.mark.processes
def test_finished_run_continues_with_more_rounds_and_never_redoes_one(share: Path) -> None:
    s = Share(share)
    coord = start("coordinator", "--share", str(share), "--rounds", "2")
    w = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    assert finish(coord, 120) and coord.returncode == 0
    finish(w, 30)
    closed = {r: s.path(s.summary(r)).read_bytes() for r in (1, 2)}

    fewer = run("coordinator", "--share", str(share), "--rounds", "1")
    assert fewer.returncode == 3 and "at least 2" in fewer.stderr

    coord = start("coordinator", "--share", str(share), "--rounds", "3")
    wait_until(lambda: not s.exists(s.final_marker), 60, "the coordinator to reopen the run")
    w = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    out = finish(coord, 120)
    finish(w, 30)
    assert coord.returncode == 0, out
    assert {r: s.path(s.summary(r)).read_bytes() for r in (1, 2)} == closed
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "final").round == 3
    assert summary(s, 3).accepted[0].worker == "w1"
    assert len(s.path(s.metrics).read_text().splitlines()) == 1 + 3


@pytest.mark.processes
def test_other_format_versions_are_refused_by_every_role(share: Path, tmp_path: Path) -> None:
    """A newer format by every role; a format-1 share (shards derived with NumPy's generators) as an older run."""
    manifest = "format: {}\nrun_id: x\ncreated: x\ncreated_by: coordinator\nconfig: {{}}\n"
    (share / "fedsync.yaml").write_text(manifest.format(FORMAT_VERSION + 1))
    old = tmp_path / "format-1"
    old.mkdir()
    (old / "fedsync.yaml").write_text(manifest.format(1))
    commands = (["coordinator", "--share", str(share)], ["worker", "--share", str(share), "--name", "w"],
                ["status", "--share", str(share)], ["coordinator", "--share", str(old)])
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda args: run(*args), commands))
    for args, out in zip(commands, outs):
        assert out.returncode == 4, (args, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)
    assert all("newer fedsync" in out.stderr for out in outs[:3])
    assert "older share format 1" in outs[3].stderr and "finish that run with the fedsync that started it" \
        in outs[3].stderr


@pytest.mark.processes
def test_a_diverging_run_stops_with_the_reasons_and_what_to_do(share: Path) -> None:
    """lr=1000: both workers' updates blow up and are rejected; the coordinator says why in one line and stops
    (exit 9) instead of waiting for updates that will never come. Rejections are logged when they happen."""
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "lr=1000", "--set", "min_workers=2",
                  "--set", "round_timeout=600")
    workers = [start("worker", "--share", str(share), "--name", w, "--device", "cpu", "--wait-for-run", "60")
               for w in ("w1", "w2")]
    try:
        out = finish(coord, timeout=120)
        time.sleep(3)  # the workers' next look at the share (a rescan every 2 s, inotify sooner) sees it stopped
    finally:
        for w in workers:
            w.terminate()
        worker_out = "".join(finish(w, timeout=30) for w in workers)
    assert coord.returncode == 9, out + worker_out
    stuck = [line for line in out.splitlines() if "round 1 cannot close" in line]
    assert len(stuck) == 1 and "w1: " in stuck[0] and "w2: " in stuck[0] and "lower lr" in stuck[0], out
    assert out.count("round 1: rejected w") == 2, out  # each rejection reported when it was decided
    assert "Traceback" not in out
    st = json.loads(run("status", "--share", str(share), "--json").stdout)  # the open round's, from the lease
    assert sorted(x["worker"] for x in st["rejected_open_round"]) == ["w1", "w2"], st
    assert all(x["reason"] in ("diverged", "non_finite", "norm_outlier") for x in st["rejected_open_round"]), st
    assert worker_out.count("WARNING: training diverged") == 2, worker_out  # each says so instead of uploading
    # and each worker, left waiting, says that the coordinator stopped and why (from its lease)
    assert worker_out.count("the coordinator stopped (round 1 cannot close: every live assigned worker's update was "
                            "rejected") == 2, worker_out


@pytest.mark.processes
def test_a_forged_round_is_passed_over_by_workers_and_opened_again_by_the_coordinator(share: Path) -> None:
    """Someone with write access but no key plants round 2 (a zeroed model, an assignment signed with their own key)
    before any worker starts. The worker refuses it and trains round 1; the coordinator opens round 2 over the
    forgery; the run finishes on real models. Then a trust.yaml replaced by a forger stops the coordinator's
    restart (exit 10) and changes nothing."""
    s = Share(share)
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "round_timeout=60")
    with killed_on_error(coord):
        # after its start-up sweep of temporary files, which would take the forger's half-written files too
        wait_until(lambda: getattr(read_lease(s), "state", None) == "waiting for workers", 60, "the run to start")
        forger = load_identity(share.parent / "forger.pem")[0]
        model = {"w": torch.zeros(3)}
        ref = save_state(s.write, s.global_model(2), model)
        forged = Assignment(format=FORMAT_VERSION, run_id=read_yaml(share / "fedsync.yaml")["run_id"], round=2,
                            rounds=2, model=ref, num_shards=1, time_budget_s=60.0,
                            workers={"w1": WorkerTask(shard=0, local_epochs=1)},
                            shards=FileRef("shards/001.safetensors", "cd" * 32, 10))
        forged.signature = forger.sign(assignment_message(forged))
        s.make_folder(s.updates_dir(2))
        write_yaml(share / s.assignment(2), to_dict(forged))
        worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
        out = finish(coord, timeout=120)
        worker_out = finish(worker, timeout=30)
    assert coord.returncode == 0 and worker.returncode == 0, out + worker_out
    assert "round 2: WARNING: assignment.yaml is not signed by the run's coordinator" in worker_out, worker_out
    assert "was not written by this coordinator (it is not signed by this coordinator): opening the round over it" \
        in out, out
    assert [x.worker for x in summary(s, 1).accepted] == ["w1"] and [x.worker for x in summary(s, 2).accepted] == ["w1"]
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.test_accuracy > 0.5, final  # trained from the real models, not the zeroed one
    trust = read_yaml(share / "trust.yaml")
    trust["workers"]["w1"]["key"] = forger.public  # a forger swaps in their own key for w1
    write_yaml(share / "trust.yaml", trust)
    before = {p: p.read_bytes() for p in share.rglob("*") if p.is_file()}
    again = run("coordinator", "--share", str(share), "--rounds", "3", "--set", "round_timeout=60")
    assert again.returncode == 10 and "trust.yaml is not signed by this run's coordinator key" in again.stderr, again
    assert {p: p.read_bytes() for p in share.rglob("*") if p.is_file()} == before


@pytest.mark.processes
def test_evaluation_runs_beside_the_next_round_and_a_crash_in_it_loses_nothing(share: Path) -> None:
    """A coordinator that evaluates slowly (FEDSYNC_SLOWDOWN) opens round 2 before round 1's evaluation lands; killed
    when it starts evaluating round 2, it is started again and evaluates what is missing; the run finishes with
    every round's metrics."""
    s = Share(share)
    args = ("coordinator", "--share", str(share), "--rounds", "3", "--set", "eval_batch_size=16")
    doomed = start(*args, fault="coordinator:evaluating:2", env={"FEDSYNC_SLOWDOWN": "150"})
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(doomed, worker):
        out = finish(doomed, timeout=120)
        assert doomed.returncode == -signal.SIGKILL, f"the fault was never reached:\n{out}"
        assert s.exists(s.evaluation(1)) and not s.exists(s.evaluation(2))
        opened_2 = s.path(s.assignment(2)).stat().st_mtime_ns
        assert opened_2 < s.path(s.evaluation(1)).stat().st_mtime_ns, "round 2 waited for round 1's evaluation"
        coord = start(*args)
        out = finish(coord, timeout=120)
        finish(worker, timeout=30)
    assert coord.returncode == 0, out
    for r in (1, 2, 3):
        ev = parse(Evaluation, s.read_yaml(s.evaluation(r)), "e")
        assert ev.model == summary(s, r).model.blake3 and ev.samples == 359 and ev.device == "cpu"
    rows = list(csv.DictReader(s.path(s.metrics).open()))
    assert [int(x["round"]) for x in rows] == [1, 2, 3] and all(x["test_accuracy"] for x in rows), rows
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.test_accuracy == parse(Evaluation, s.read_yaml(s.evaluation(3)), "e").test_accuracy > 0.8


@pytest.mark.processes
def test_an_update_that_makes_the_model_s_loss_non_finite_is_taken_out_before_the_round_closes(share: Path) -> None:
    """An enrolled worker sends a finite, valid update whose weights are so large that the model's activations
    overflow: with the screens turned off it would be aggregated, and the round's model would evaluate to NaN (it
    used to be signed as the run's final model with exit 0). The coordinator tries each aggregate on held-out
    examples first: it takes the update out and closes the round without it."""
    s = Share(share)
    for w in ("good", "evil"):
        register_worker(s, w)  # enrolled: its own key, signing what it sends
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", "min_workers=2",
                  "--set", "screen_factor=0", "--set", "screen_max_ratio=0", "--set", "clip_factor=0",
                  "--set", "screen_direction=false")
    with killed_on_error(coord):
        wait_until(lambda: s.exists(s.assignment(1)), 60, "round 1 to open")
        a = parse(Assignment, s.read_yaml(s.assignment(1)), "assignment")
        base = load_verified(s, s.global_model(1), a.model)
        gen = torch.Generator().manual_seed(0)
        submit_update(s, a, "good", {k: torch.randn(v.shape, generator=gen) * 1e-3 if v.is_floating_point()
                                     else torch.zeros_like(v) for k, v in base.items()}, samples=100)
        huge = {k: torch.full_like(v, 1e15) if k.endswith("weight") else torch.zeros_like(v) for k, v in base.items()}
        submit_update(s, a, "evil", huge, samples=100)
        out = finish(coord, timeout=120)
    assert coord.returncode == 0, out
    rejected = parse(Summary, s.read_yaml(s.summary(1)), "summary").rejected
    assert [(x.worker, x.reason) for x in rejected] == [("evil", "spoils_aggregate")], out
    assert "loss on held-out examples was nan" in rejected[0].detail, rejected
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.test_accuracy > 0.0 and "test loss nan" not in out, out
