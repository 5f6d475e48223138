"""A real coordinator and two real workers, as separate processes, train digits over a temporary share."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsync.learning.tasks import get_task
from fedsync.learning.train import evaluate
from fedsync.run.config import load_config, load_data
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import coordinator_key_path, sealing_key_path
from fedsync.storage.markers import Assignment, FinalMarker, Summary, UpdateMarker, parse
from fedsync.storage.sealing import SealingIdentity, seal
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified, state_bytes
from fedsync.tensors.residuals import residual_dir

from .helpers import assert_sealed, finish, killed_on_error, opened_update, read_yaml, run, start, write_yaml

ROUNDS = 6
OUTSIDER = Path(__file__).resolve().parent / "independent_worker.py"
CONFIG_VALUES = {"min_workers": 2, "federated_eval": 0.2}  # each worker also evaluates on a fifth of its shard
CONFIG = tuple(a for k, v in CONFIG_VALUES.items() for a in ("--set", f"{k}={v}"))
README = Path(__file__).resolve().parent.parent / "README.md"
PARAMETERS = [n for n, _ in get_task("digits").build_model("digits_cnn").named_parameters()]


@pytest.mark.processes
def test_two_workers_reach_real_accuracy(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", str(ROUNDS), *CONFIG)
    workers = [start("worker", "--share", str(share), "--name", f"w{i}", "--device", "cpu",
                     "--wait-for-run", "60") for i in (1, 2)]
    out = finish(coord, timeout=180)
    outs = [finish(w, timeout=30) for w in workers]
    assert coord.returncode == 0, out
    assert all(w.returncode == 0 for w in workers), outs
    assert all("eager training step: CUDA graphs need a CUDA GPU, and this worker trains on cpu" in o for o in outs)

    s = Share(share)
    federated: list[float] = []
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.round == ROUNDS and final.test_accuracy >= 0.93, out
    assert hash_bytes(s.path(s.final_model).read_bytes()) == final.model.blake3
    for r in range(1, ROUNDS + 1):
        a = parse(Assignment, s.read_yaml(s.assignment(r)), "a")
        assert sorted(a.workers) == ["w1", "w2"] and a.num_shards == 2
        assert hash_bytes(s.path(s.global_model(r)).read_bytes()) == a.model.blake3
        lists = load_verified(s, a.shards.file, a.shards)  # the shards, listed by index in load_digits()' order
        assert a.shards.file == "shards/002.safetensors" and sorted(lists) == ["0", "1"]
        listed = [set(lists[k].tolist()) for k in ("0", "1")]
        assert not listed[0] & listed[1] and len(listed[0] | listed[1]) == 1438  # of 1,797: the rest is the test set
        assert listed[0] | listed[1] <= set(range(1797))
        summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
        assert sorted(x.worker for x in summary.accepted) == ["w1", "w2"]
        assert summary.rejected == [] and summary.missing == []
        held = []
        for w in ("w1", "w2"):
            m = parse(UpdateMarker, s.read_yaml(s.update_marker(r, w)), "m")
            assert m.base == a.model.blake3 and m.round == r
            assert hash_bytes(s.path(s.update_tensors(r, w, sealed=True)).read_bytes()) == m.tensors.blake3
            assert m.encryption == "age" and m.tensors.file == f"{w}.safetensors.age"
            # 1,438 training images in two shards of 719: a fifth of each (143) held out, the rest trained on
            assert m.evaluation.samples == 143 and m.samples == 719 - 143
            assert set(m.timings) == {"prepare_s", "evaluate_s", "train_s", "publish_s"}
            assert all(v >= 0 for v in m.timings.values()) and sum(m.timings.values()) <= m.seconds + 0.01
            held.append(m.evaluation)
        fed = summary.federated
        sizes = [s.path(s.update_tensors(r, w, sealed=True)).stat().st_size for w in ("w1", "w2")]
        assert_sealed(s, r, ["w1", "w2"])
        # the next model is the old one plus the plain FedAvg of the updates the coordinator's key opens
        before = load_verified(s, s.global_model(r), a.model)
        after = load_verified(s, summary.model.file, summary.model)
        opened = {x.worker: (opened_update(s, r, x.worker), x.weight) for x in summary.accepted}
        for k in PARAMETERS:
            mean = sum(u[k].double() * weight for u, weight in opened.values()) / sum(w for _, w in opened.values())
            torch.testing.assert_close(after[k].double(), before[k].double() + mean, atol=1e-6, rtol=1e-5)
        assert summary.traffic.model_bytes == a.model.bytes and summary.traffic.down_bytes == 2 * a.model.bytes
        assert summary.traffic.up_bytes == sum(sizes) == sum(x.bytes for x in summary.accepted)
        assert list(summary.compute) == ["CPU"] and abs(summary.compute["CPU"] - sum(
            x.train_s for x in summary.accepted)) < 1e-3 and all(x.train_s > 0 for x in summary.accepted)
        assert fed.samples == sum(e.samples for e in held)
        assert abs(fed.accuracy - sum(e.accuracy * e.samples for e in held) / fed.samples) < 1e-9
        federated.append(fed.accuracy)
    assert federated[0] < 0.3 and federated[-1] >= 0.9, federated  # round 1 starts from random weights
    seeded = get_task("digits").build_model("digits_cnn", seed=read_yaml(s.path(s.manifest))["config"]["seed"])
    first = load_verified(s, s.global_model(1), parse(Assignment, s.read_yaml(s.assignment(1)), "a").model)
    assert set(first) == set(seeded.state_dict()) and all(torch.equal(first[k], v)
                                                          for k, v in seeded.state_dict().items())
    rows = list(csv.DictReader(s.path(s.metrics).open()))
    assert [int(r["round"]) for r in rows] == list(range(1, ROUNDS + 1))
    assert {"round", "test_accuracy", "test_loss", "train_loss", "updates_accepted", "seconds"} <= set(rows[0])
    assert abs(float(rows[-1]["test_accuracy"]) - final.test_accuracy) < 1e-6
    assert [round(float(row["federated_accuracy"]), 6) for row in rows] == [round(f, 6) for f in federated]
    assert all(int(row["up_bytes"]) > 0 and float(row["train_s"]) > 0 and row["closed_at"] for row in rows)
    assert not [p for p in share.rglob("*") if p.name.endswith(".tmp")]

    # status reads the same story back, as text and as JSON
    text = run("status", "--share", str(share))
    assert text.returncode == 0 and "finished after round 6" in text.stdout
    recipient = read_yaml(s.path(s.manifest))["recipient"]
    assert f"updates sealed to {recipient} (only the coordinator reads them)" in text.stdout, text.stdout
    js = run("status", "--share", str(share), "--json")
    st = json.loads(js.stdout)
    assert st["state"] == "finished" and st["final"]["round"] == ROUNDS
    assert {w["name"] for w in st["workers"]} == {"w1", "w2"}

    # eval reproduces a round's recorded accuracy; export writes the final model, and the README's lines load it
    recorded = read_yaml(share / s.evaluation(2))["test_accuracy"]
    scored = json.loads(run("eval", "--share", str(share), "--round", "2", "--json").stdout)
    assert scored["round"] == 2 and abs(scored["test_accuracy"] - recorded) < 1e-9 and scored["device"] == "cpu"
    exported = share.parent / "model.safetensors"
    wrote = run("export", str(exported), "--share", str(share))
    assert wrote.returncode == 0 and f"round {ROUNDS}" in wrote.stdout, wrote.stdout + wrote.stderr
    block = re.search(r"```python\n(import json\nfrom safetensors.*?)```", README.read_text(), re.S)
    assert block, "README.md shows how to load an exported model"
    loaded: dict[str, Any] = {}
    exec(block.group(1).replace('"model.safetensors"', repr(str(exported))), loaded)  # noqa: S102 - the README's
    assert loaded["meta"]["fedsync.round"] == str(ROUNDS) and loaded["meta"]["fedsync.task"] == "digits"
    cfg = load_config("digits", dict(CONFIG_VALUES))
    test = load_data(cfg, None, print)[1]
    assert abs(evaluate(loaded["model"], test, 1024)[1] - final.test_accuracy) < 1e-9

    # the same command again continues the finished run without redoing any round
    again = run("coordinator", "--share", str(share), "--rounds", str(ROUNDS), *CONFIG)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(list(csv.DictReader(s.path(s.metrics).open()))) == ROUNDS

    # another config is refused with one clear line, and nothing is overwritten
    before = s.path(s.manifest).read_bytes()
    refused = run("coordinator", "--share", str(share), "--set", "lr=0.5")
    assert refused.returncode == 3
    assert "another config" in refused.stderr and "lr" in refused.stderr and "Traceback" not in refused.stderr
    assert s.path(s.manifest).read_bytes() == before


@pytest.mark.processes
def test_an_outsiders_worker_is_accepted_and_verify_reports_intact_runs_and_names_damage(share: Path,
                                                                                          tmp_path: Path) -> None:
    """Beside a fedsync worker, tests/independent_worker.py, written from docs/PROTOCOL.md alone (it imports nothing
    from fedsync: the test that keeps the document complete), has its update accepted every round; `fedsync verify`
    then checks the whole run, the outsider's files included, and names each kind of damage."""
    assert not re.search(r"^\s*(from|import)\s+(fedsync|tests)\b", OUTSIDER.read_text(), re.M)
    # DiLoCo's recipe with int8 updates: the outsider encodes them from section 5.13 alone, the coordinator decodes
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "min_workers=2",
                  "--preset", "diloco", "--set", "local_steps=45", "--set", "compression=int8")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    outsider = subprocess.Popen([sys.executable, str(OUTSIDER), str(share), "outsider", str(tmp_path / "outsider.pem")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    with killed_on_error(coord, worker, outsider):
        out = finish(coord, timeout=180)
        outs = finish(worker, timeout=30) + finish(outsider, timeout=30)
    assert coord.returncode == 0 and outsider.returncode == 0, out + outs
    s = Share(share)
    for r in (1, 2):
        assert [x.worker for x in parse(Summary, s.read_yaml(s.summary(r)), "s").accepted] == ["outsider", "w1"], out
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "f").test_accuracy >= 0.85, out
    for r in (1, 2):
        summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
        assert summary.server_optimizer == "nesterov" and summary.server_state is not None
        assert summary.traffic is not None and summary.traffic.up_bytes <= 0.27 * 2 * summary.traffic.model_bytes
        for w in ("outsider", "w1"):
            marker = parse(UpdateMarker, s.read_yaml(s.update_marker(r, w)), "m")
            assert marker.encoding == "int8" and marker.steps == 45, marker
    run_id = read_yaml(s.path(s.manifest))["run_id"]
    kept = sorted(p.name for p in residual_dir().glob(f"{run_id}-w1-r*.safetensors"))
    assert kept == [f"{run_id}-w1-r000001.safetensors", f"{run_id}-w1-r000002.safetensors"]  # on its own disk
    assert not list(share.rglob("*residual*"))
    key = str(sealing_key_path(coordinator_key_path()))
    ok = run("verify", "--share", str(share), "--key", key)
    assert ok.returncode == 0 and "0 error(s)" in ok.stdout, ok.stdout  # the outsider's sealed files open too
    # an accepted update swapped for one sealed to another key, its marker's hash edited to match: only the key sees it
    tensors, marker = s.path(s.update_tensors(2, "w1", sealed=True)), s.path(s.update_marker(2, "w1"))
    kept = tensors.read_bytes(), marker.read_bytes()
    stranger = seal(state_bytes({"x": torch.zeros(3)}), SealingIdentity.generate().recipient)
    tensors.write_bytes(stranger)
    edited = read_yaml(marker)
    edited["tensors"].update(blake3=hash_bytes(stranger), bytes=len(stranger))
    write_yaml(marker, edited)
    assert run("verify", "--share", str(share)).returncode == 0  # its hash is the marker's
    opened = run("verify", "--share", str(share), "--key", key)
    assert opened.returncode == 8 and "0002/updates/w1.safetensors.age: undecryptable: it is not sealed to this " \
        "coordinator's key" in opened.stdout, opened.stdout
    tensors.write_bytes(kept[0])
    marker.write_bytes(kept[1])

    (s.path(s.updates_dir(1)) / ".w1.safetensors.abc.tmp").write_bytes(b"x")  # a leftover: a hint, not damage
    (s.path(s.round_dir(2)) / "summary.sync-conflict-20261123-101010-ABCDEFG.yaml").write_text("x")
    hinted = run("verify", "--share", str(share), "--json")
    found = json.loads(hinted.stdout)["findings"]
    assert hinted.returncode == 0 and {f["level"] for f in found} == {"hint"} and len(found) == 2

    damaged = bytearray(s.path(s.update_tensors(1, "w1", sealed=True)).read_bytes())
    damaged[-1] ^= 1
    s.path(s.update_tensors(1, "w1", sealed=True)).write_bytes(bytes(damaged))
    s.path(s.global_model(2)).unlink()
    bad = run("verify", "--share", str(share))
    assert bad.returncode == 8, bad.stdout
    assert "error: 0001/updates/w1.safetensors.age: hash_mismatch" in bad.stdout
    assert "error: 0002/global.safetensors: missing\n" in bad.stdout
    assert bad.stdout.count("error:") == 2  # round 2's global model, also round 1's aggregate, is named once

    assignment = read_yaml(s.path(s.assignment(1)))
    assignment["workers"]["w1"]["local_epochs"] = 50  # edited after the coordinator signed it
    write_yaml(s.path(s.assignment(1)), assignment)
    trust = read_yaml(s.path(s.trust))
    trust["workers"]["w1"]["state"] = "approved"
    write_yaml(s.path(s.trust), trust)
    forged = run("verify", "--share", str(share))
    assert "error: 0001/assignment.yaml: not signed by the run's coordinator key" in forged.stdout, forged.stdout
    assert "error: trust.yaml: " in forged.stdout and forged.stdout.count("error:") == 4, forged.stdout  # 2 + these 2
