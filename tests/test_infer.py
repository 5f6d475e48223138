"""Inference jobs through real processes (docs/PROTOCOL.md section 5.14): after a digits run, serving workers and
`fedsync infer` predict the test set with the accuracy the run recorded; a serving worker SIGKILLed mid-job and the
submitter killed and started again still give every input exactly once; bad inputs are named, never a crash."""

from __future__ import annotations

import csv
import io
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fedsync.base.errors import ShareError
from fedsync.infer import InferOptions, Submitter
from fedsync.learning.data import load_digits
from fedsync.learning.inputs import open_inputs
from fedsync.run.config import config_from_dict
from fedsync.run.start import task_record
from fedsync.run.submitting.jobs import MAX_CHUNKS, write_job
from fedsync.storage import names
from fedsync.storage.jobfiles import list_jobs, read_plan
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Evaluation,
    FinalMarker,
    JobPlan,
    OutputMarker,
    WorkerInfo,
    to_dict,
)
from fedsync.storage.share import Share
from fedsync.storage.signing import output_message
from fedsync.storage.yamlfile import dump_yaml
from fedsync.tensors.files import save_state

from .helpers import finish, killed_on_error, register_worker, run, start, wait_until, worker_identity

SETTINGS = ("--set", "min_workers=2", "--set", "heartbeat=1", "--set", "worker_timeout=5")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-round digits run whose workers have left (each test starts its own serving workers)."""
    share = tmp_path_factory.mktemp("infer") / "share"
    share.mkdir()
    coord = start("coordinator", "--share", str(share), "--rounds", "2", *SETTINGS)
    workers = [start("worker", "--share", str(share), "--name", f"t{i}", "--wait-for-run", "60") for i in (1, 2)]
    with killed_on_error(coord, *workers):
        out = finish(coord, timeout=180)
        for w in workers:
            finish(w, timeout=30)
    assert coord.returncode == 0, out
    return share


@pytest.fixture(scope="module")
def test_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """The coordinator's test examples (seed 0, test_fraction 0.2, eval_samples null) as a safetensors file."""
    test = load_digits(0, 0.2).test
    path = tmp_path_factory.mktemp("inputs") / "digits-test.safetensors"
    save_file({"x": test.x.contiguous(), "ids": torch.arange(5000, 5000 + len(test.y))}, str(path))
    return path, test.y


def serving(share: Path, name: str, slowdown: float | None = None) -> subprocess.Popen[str]:
    return start("worker", "--share", str(share), "--name", name, "--serve",
                 env={"FEDSYNC_SLOWDOWN": str(slowdown)} if slowdown else None)


def stop(*procs: subprocess.Popen[str]) -> list[str]:
    """SIGTERM, as `kill` or systemd would: a serving worker leaves as on Ctrl-C (state stopped)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    return [finish(p, timeout=30) for p in procs]


def predictions(out: Path) -> list[dict[str, str]]:
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def accuracy(rows: list[dict[str, str]], labels: torch.Tensor) -> float:
    return sum(int(r["class"]) == int(labels[int(r["index"])]) for r in rows) / len(labels)


@pytest.mark.processes
def test_two_serving_workers_reproduce_the_runs_test_accuracy(trained: Path, test_set: tuple[Path, torch.Tensor],
                                                              tmp_path: Path) -> None:
    inputs, labels = test_set
    s = Share(trained)
    final = s.read_record(FinalMarker, s.final_marker)
    workers = [serving(trained, f"s{i}") for i in (1, 2)]
    out = tmp_path / "preds.csv"
    with killed_on_error(*workers):
        for name in ("s1", "s2"):  # both serving before the job starts, so both get chunks from the first plan on
            wait_until(lambda: s.exists(s.worker_file(name)) and s.read_record(WorkerInfo, s.worker_file(name)).serves,
                       120, f"{name} to register")
        done = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(out), "--chunk-rows", "24",
                   "--name", "whole", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        status = run("status", "--share", str(trained))
        exported = run("export", str(tmp_path / "model.safetensors"), "--share", str(trained))
        from_file = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(tmp_path / "f.csv"),
                        "--model", str(tmp_path / "model.safetensors"), timeout=120)
        from_round = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(tmp_path / "r.csv"),
                         "--model", "1", timeout=120)
        logs = stop(*workers)
    assert exported.returncode == 0 and from_file.returncode == 0 and from_round.returncode == 0, \
        exported.stderr + from_file.stdout + from_file.stderr + from_round.stdout + from_round.stderr
    assert "model file model.safetensors" in from_file.stdout and "model round 1" in from_round.stdout
    assert [r["class"] for r in predictions(tmp_path / "f.csv")] == [r["class"] for r in predictions(out)]
    round1 = s.read_record(Evaluation, s.evaluation(1)).test_accuracy  # round 1's model, as the coordinator measured
    assert accuracy(predictions(tmp_path / "r.csv"), labels) == pytest.approx(round1, abs=1e-12)
    rows = predictions(out)
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    assert [r["id"] for r in rows] == [str(5000 + i) for i in range(len(labels))]
    assert accuracy(rows, labels) == pytest.approx(final.test_accuracy, abs=1e-12)  # the same model, the same answer
    logits = load_file(str(tmp_path / "preds.safetensors"))["logits"]
    assert logits.shape == (len(labels), 10)
    assert [int(c) for c in logits.argmax(1)] == [int(r["class"]) for r in rows]
    plan = read_plan(s, "whole")
    assert plan is not None and plan.state == "done" and plan.queues == {}
    assert sorted(c for cs in plan.accepted.values() for c in cs) == list(range(15))
    assert set(plan.accepted) == {"s1", "s2"}, plan.accepted  # both served
    assert "job whole: done, 15/15 chunks" in status.stdout, status.stdout
    assert all("predicted in" in log for log in logs), logs
    info = s.read_record(WorkerInfo, s.worker_file("s1"))
    assert info.serves and info.infer_samples_per_s and info.state == "stopped"
    check = run("verify", "--share", str(trained))
    assert check.returncode == 0, check.stdout
    again = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(tmp_path / "again.csv"),
                "--chunk-rows", "24", "--name", "whole", timeout=60)
    assert again.returncode == 0 and "continuing job whole" in again.stdout, again.stdout
    assert predictions(tmp_path / "again.csv") == rows  # a finished job merges again, no worker needed
    other = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(tmp_path / "x.csv"),
                "--chunk-rows", "30", "--name", "whole", timeout=60)
    assert other.returncode == 3 and "another chunk rows" in other.stderr, other.stderr


@pytest.mark.processes
def test_a_killed_worker_and_a_killed_submitter_lose_and_double_nothing(
        trained: Path, test_set: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    inputs, labels = test_set
    s = Share(trained)
    slow = [serving(trained, f"k{i}", slowdown=60) for i in (1, 2)]
    out = tmp_path / "preds.csv"
    args = ("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(out), "--chunk-rows", "8",
            "--name", "killed")
    submitter = start(*args)
    with killed_on_error(submitter, *slow):
        def taken() -> int:
            plan = read_plan(s, "killed")
            return sum(len(cs) for cs in plan.accepted.values()) if plan else 0

        wait_until(lambda: taken() >= 4, 120, "four chunks taken")
        submitter.kill()  # SIGKILL, mid-job
        submitter.communicate()
        victim = slow[0]
        wait_until(lambda: (read_plan(s, "killed") or None) is not None, 5, "the plan")
        victim.kill()  # SIGKILL: no stopped state, its heartbeat just ends; its chunks go to the other after 5 s
        victim.communicate()
        before = taken()
        restarted = start(*args)
        out_text = finish(restarted, timeout=180)
        logs = stop(slow[1])
    assert restarted.returncode == 0, out_text
    assert "continuing job killed" in out_text and before < 45
    rows = predictions(out)
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))  # every input exactly once, in order
    assert accuracy(rows, labels) == pytest.approx(s.read_record(FinalMarker, s.final_marker).test_accuracy, abs=1e-12)
    plan = read_plan(s, "killed")
    assert plan is not None and plan.state == "done"
    taken_chunks = sorted(c for cs in plan.accepted.values() for c in cs)
    assert taken_chunks == list(range(45))  # each chunk's output taken once
    assert "k2" in plan.accepted and "k1" not in plan.queues
    assert "predicted in" in logs[0]


@pytest.mark.processes
def test_bad_inputs_are_named_per_input_and_wrong_shapes_refused_before_anything_is_written(
        trained: Path, test_set: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    inputs, labels = test_set
    x = load_file(str(inputs))["x"][:40].clone()
    x[3, 0, 0, 0] = float("nan")
    x[17, 0, 4, 4] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": x}, str(bad))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(12):
        pixels = (load_file(str(inputs))["x"][i, 0] * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        (images / ("sub" if i % 2 else "") / f"img{i:02d}.png").write_bytes(buffer.getvalue())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    (images / "notes.txt").write_text("not an image: never listed")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(5, 3, 8, 8)}, str(wrong))

    refused = run("infer", "--share", str(trained), "--inputs", str(wrong), "--out", str(tmp_path / "w.csv"))
    assert refused.returncode == 6 and "x is shaped [5, 3, 8, 8]" in refused.stderr, refused.stderr
    assert not any(j.startswith("wrong") for j in list_jobs(Share(trained)))
    many = tmp_path / "many.safetensors"
    save_file({"x": torch.zeros(MAX_CHUNKS + 1, 1, 8, 8)}, str(many))
    refused = run("infer", "--share", str(trained), "--inputs", str(many), "--out", str(tmp_path / "m.csv"),
                  "--chunk-rows", "1")
    assert refused.returncode == 3 and f"more than {MAX_CHUNKS} chunks" in refused.stderr, refused.stderr
    assert not any(j.startswith("many") for j in list_jobs(Share(trained)))
    refused = run("infer", "--share", str(trained), "--inputs", str(inputs), "--out", str(tmp_path / "o.csv"),
                  "--model", str(wrong), "--name", "other")  # a file that is no model of this run's
    assert refused.returncode == 3 and "not a digits_cnn model of task" in refused.stderr, refused.stderr
    assert not any(j.startswith("other") for j in list_jobs(Share(trained)))
    # temporaries a killed serving of b1's left in a job's outputs: b1 deletes its own when it starts, no other's
    s = Share(trained)
    manifest = read_manifest(s)
    cfg = config_from_dict(manifest.config, "fedsync.yaml")
    opened = open_inputs(inputs, cfg.resolved_task().input_shape, True)
    write_job(s, "left-behind", manifest.run_id, task_record(cfg), cfg.model, b"never served: no plan", "final",
              opened, opened.identity(), 10, lambda i, n: None)
    outputs = trained / names.outputs_dir("left-behind")
    outputs.mkdir(parents=True, exist_ok=True)
    mine = [outputs / ".000001.b1.safetensors.0123456789ab.tmp", outputs / ".000002.b1.yaml.0123456789ab.tmp"]
    theirs = outputs / ".000001.c9.yaml.0123456789ab.tmp"
    for p in (*mine, theirs):
        p.write_text("half written")

    worker = serving(trained, "b1")
    with killed_on_error(worker):
        wait_until(lambda: s.exists(s.worker_file("b1")) and s.read_record(WorkerInfo, s.worker_file("b1")).serves,
                   120, "b1 to register")
        assert not any(p.exists() for p in mine) and theirs.exists()
        theirs.unlink()
        done = run("infer", "--share", str(trained), "--inputs", str(bad), "--out", str(tmp_path / "bad.csv"),
                   "--chunk-rows", "16", timeout=120)
        pictures = run("infer", "--share", str(trained), "--inputs", str(images), "--out",
                       str(tmp_path / "img.csv"), "--chunk-rows", "5", timeout=120)
        foreign_job(trained, tmp_path / "twenty.safetensors", load_file(str(inputs))["x"][:20])
        forged_job(trained, tmp_path / "twenty.safetensors")  # looked at first: its name sorts first
        foreign = run("infer", "--share", str(trained), "--inputs", str(tmp_path / "twenty.safetensors"), "--out",
                      str(tmp_path / "foreign.csv"), "--chunk-rows", "10", "--name", "foreign", timeout=120)
        log = stop(worker)[0]
    assert "job aaa-forged: not serving it: its model does not load into digits_cnn" in log, log
    assert done.returncode == 0, done.stderr
    assert "2 could not be predicted" in done.stdout, done.stdout
    rows = predictions(tmp_path / "bad.csv")
    assert {int(r["index"]) for r in rows if r["problem"]} == {3, 17}
    assert all(r["problem"].startswith("non_finite") and r["class"] == "" for r in rows if int(r["index"]) in (3, 17))
    assert all(r["class"] != "" for r in rows if int(r["index"]) not in (3, 17))

    assert pictures.returncode == 0, pictures.stderr
    rows = predictions(tmp_path / "img.csv")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 13  # the .txt is not an input
    broken = [r for r in rows if r["id"] == "broken.png"]
    assert broken[0]["problem"].startswith("unreadable_image") and broken[0]["class"] == ""
    by_image = {r["id"]: int(r["class"]) for r in rows if r["id"] != "broken.png"}
    expected = {(f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.png"): int(labels[i]) for i in range(12)}
    assert sum(by_image[k] == v for k, v in expected.items()) >= 11  # 8-bit images of the test digits

    assert foreign.returncode == 0 and "10 could not be predicted" in foreign.stdout, foreign.stdout
    rows = predictions(tmp_path / "foreign.csv")
    assert all(r["problem"].startswith("wrong_shape: x is torch.float32 [10, 3, 8, 8]") and r["class"] == ""
               for r in rows[10:]), rows[10]
    assert all(r["class"] != "" and not r["problem"] for r in rows[:10])

    s = Share(trained)
    for job in list_jobs(s):
        plan = read_plan(s, job)
        for worker_name, chunks in (plan.accepted.items() if plan else ()):
            for c in chunks:
                m = s.read_record(OutputMarker, names.output_marker(job, c, worker_name))
                assert m.signature and m.job == job


def foreign_job(share: Path, path: Path, x: torch.Tensor) -> None:
    """Job `foreign` over `x`, written as a submitter would except that its second chunk holds inputs of another
    shape (a damaged or foreign share): the worker must refuse that chunk in its output, not crash."""
    save_file({"x": x.contiguous()}, str(path))
    s = Share(share)
    manifest = read_manifest(s)
    cfg = config_from_dict(manifest.config, "fedsync.yaml")
    inputs = open_inputs(path, cfg.resolved_task().input_shape, True)

    class Foreign:
        kind, rows = inputs.kind, inputs.rows

        @staticmethod
        def chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
            return inputs.chunk(start, stop) if start == 0 else {"x": torch.zeros(stop - start, 3, 8, 8)}

    final = s.read_record(FinalMarker, s.final_marker)
    write_job(s, "foreign", manifest.run_id, task_record(cfg), cfg.model, s.read_verified(s.final_model, final.model),
              "final (round 2)", Foreign, inputs.identity(), 10, lambda i, n: None)  # type: ignore[arg-type]


def forged_job(share: Path, inputs: Path) -> None:
    """Job `aaa-forged`, written by hand as a forger would (no submitter): whole files with their hashes, but a model
    file that is no model, and a plan that gives its chunks to worker b1."""
    s = Share(share)
    manifest = read_manifest(s)
    cfg = config_from_dict(manifest.config, "fedsync.yaml")
    opened = open_inputs(inputs, cfg.resolved_task().input_shape, True)
    write_job(s, "aaa-forged", manifest.run_id, task_record(cfg), cfg.model, b"not a model", "final", opened,
              opened.identity(), 10, lambda i, n: None)
    s.write_yaml(names.job_plan("aaa-forged"), to_dict(JobPlan(
        format=FORMAT_VERSION, job="aaa-forged", owner="elsewhere:1:0", host="elsewhere", heartbeat=1,
        state="running", queues={"b1": [0, 1]}, accepted={})))


@pytest.mark.processes
def test_an_output_counts_only_signed_whole_and_finite_and_the_first_one_wins(
        trained: Path, test_set: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    """The submitter's judgement (fedsync/run/submitting/jobs.py check_output, fedsync/infer.py) on outputs written by
    hand, as a forger, a broken worker and two honest ones would."""
    s = Share(trained)
    manifest = read_manifest(s)
    cfg = config_from_dict(manifest.config, "fedsync.yaml")
    task = cfg.resolved_task()
    path = tmp_path / "twenty.safetensors"
    save_file({"x": load_file(str(test_set[0]))["x"][:20].contiguous()}, str(path))
    inputs = open_inputs(path, task.input_shape, True)
    final = s.read_record(FinalMarker, s.final_marker)
    job = write_job(s, "judged", manifest.run_id, task_record(cfg), cfg.model,
                    s.read_verified(s.final_model, final.model), "final", inputs, inputs.identity(), 10,
                    lambda i, n: None)
    for name in ("j1", "j2", "j3"):
        register_worker(s, name)
    said: list[str] = []
    submitter = Submitter(s, manifest, job, cfg, task, inputs,
                          InferOptions(share=trained, inputs=path, out=tmp_path / "o.csv"), None,  # type: ignore[arg-type]
                          said.append)
    submitter.liveness.scan()

    def output(worker: str, chunk: int, logits: torch.Tensor, signer: str | None = None,
               inputs_hash: str | None = None) -> None:
        ref = save_state(s.write, names.output_tensors("judged", chunk, worker), {"logits": logits})
        marker = OutputMarker(format=FORMAT_VERSION, job="judged", chunk=chunk, worker=worker,
                              inputs=inputs_hash or job.chunks[chunk].blake3, model=job.model.blake3, outputs=ref,
                              rows=10)
        marker.signature = worker_identity(signer or worker).sign(output_message(marker))
        s.write_yaml(names.output_marker("judged", chunk, worker), to_dict(marker))

    def problems() -> list[tuple[int, str, str]]:
        return [(p.chunk, p.worker, p.reason) for p in submitter.plan.problems]

    logits = torch.randn(10, 10)
    output("j1", 0, logits, signer="j2")  # a forgery: j1's name, another key
    submitter._collect()
    assert 0 not in submitter.done and problems() == [(0, "j1", "bad_signature")]
    nan = logits.clone()
    nan[3, 2] = float("nan")  # a NaN in a row the marker does not say failed
    output("j1", 0, nan)
    submitter._collect()
    assert 0 not in submitter.done and problems()[-1] == (0, "j1", "non_finite")
    output("j1", 1, logits, inputs_hash="0" * 64)  # computed over other inputs
    submitter._collect()
    assert 1 not in submitter.done and problems()[-1] == (1, "j1", "wrong_inputs")
    output("j2", 0, logits)
    submitter._collect()
    assert submitter.done == {0: "j2"}
    output("j3", 0, logits + 1)
    submitter._collect()
    assert submitter.done == {0: "j2"} and problems()[-1] == (0, "j3", "duplicate")  # the first one stands
    assert any("j3 for chunk 0 not taken: duplicate" in line for line in said)


@pytest.mark.processes
def test_a_live_worker_that_never_delivers_does_not_wedge_the_job(trained: Path, test_set: tuple[Path, torch.Tensor],
                                                                  tmp_path: Path) -> None:
    """A registration that heartbeats, claims to be the fastest server and never runs a chunk (a machine stuck on a
    hung mount): what it holds goes to the real worker once it is overdue, and the job ends."""
    s = Share(trained)
    stopped = threading.Event()

    def beat() -> None:
        n = 0
        while not stopped.is_set():
            n += 1
            s.store.write(s.worker_file("stuck"), dump_yaml(to_dict(WorkerInfo(
                format=FORMAT_VERSION, name="stuck", host="elsewhere", fedsync="0", torch="0", device="cuda:0",
                device_name="GPU", cuda_capability="8.9", state="idle", round=None, heartbeat=n,
                public_key=worker_identity("stuck").public, serves=True, infer_samples_per_s=1e6))))
            stopped.wait(0.5)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    worker = serving(trained, "real")
    try:
        with killed_on_error(worker):
            wait_until(lambda: s.exists(s.worker_file("real")), 120, "the real worker to register")
            done = run("infer", "--share", str(trained), "--inputs", str(test_set[0]), "--out",
                       str(tmp_path / "p.csv"), "--chunk-rows", "60", "--name", "stuck", timeout=120)
            stop(worker)
    finally:
        stopped.set()
        beating.join()
    assert done.returncode == 0, done.stdout + done.stderr
    plan = read_plan(s, "stuck")
    assert plan is not None and plan.accepted == {"real": list(range(6))}, plan
    assert len(predictions(tmp_path / "p.csv")) == len(test_set[1])


@pytest.mark.processes
def test_a_plan_kept_fresh_by_another_hosts_submitter_is_refused_and_a_stale_one_taken_over(
        trained: Path, test_set: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    """One writer per job: a submitter on another host that rewrites plan.yaml within worker_timeout (5 s here) is
    alive, and this one refuses; once it stops, this one takes the job over with what it had taken."""
    s = Share(trained)
    manifest = read_manifest(s)
    cfg = config_from_dict(manifest.config, "fedsync.yaml")
    task = cfg.resolved_task()
    path = tmp_path / "ten.safetensors"
    save_file({"x": load_file(str(test_set[0]))["x"][:10].contiguous()}, str(path))
    inputs = open_inputs(path, task.input_shape, True)
    final = s.read_record(FinalMarker, s.final_marker)
    job = write_job(s, "elsewhere", manifest.run_id, task_record(cfg), cfg.model,
                    s.read_verified(s.final_model, final.model), "final", inputs, inputs.identity(), 5,
                    lambda i, n: None)
    stopped = threading.Event()

    def other_host() -> None:
        beat = 0
        while not stopped.is_set():
            beat += 1
            s.write_yaml(names.job_plan("elsewhere"), to_dict(JobPlan(
                format=FORMAT_VERSION, job="elsewhere", owner="far:1:a", host="far", heartbeat=beat, state="running",
                queues={}, accepted={"t1": [1]})))
            stopped.wait(0.5)

    def submitter() -> Submitter:
        return Submitter(s, manifest, job, cfg, task, inputs,
                         InferOptions(share=trained, inputs=path, out=tmp_path / "o.csv"), None,  # type: ignore[arg-type]
                         lambda line: None)

    beating = threading.Thread(target=other_host, daemon=True)
    beating.start()
    try:
        wait_until(lambda: read_plan(s, "elsewhere") is not None, 10, "the other host's plan")
        with pytest.raises(ShareError, match="driven by `fedsync infer` on far"):
            submitter()
    finally:
        stopped.set()
        beating.join()
    taken_over = submitter()  # the plan no longer moves: after one worker_timeout, this one drives the job
    assert taken_over.plan.host != "far" and taken_over.done == {1: "t1"}
