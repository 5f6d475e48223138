"""The imagefolder task: each machine's own images, in torchvision's ImageFolder layout, real PNG files on disk."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsync.aggregation.rules import FedAvg
from fedsync.base.errors import ConfigError, DataError
from fedsync.learning.data import Split
from fedsync.learning.imagefolder import ImageSpec, Stream, load_folder
from fedsync.learning.tasks import DataOptions
from fedsync.learning.train import TrainSettings, local_train
from fedsync.run.config import load_config
from fedsync.run.coordinating.ledger import RoundLedger
from fedsync.run.coordinating.planning import Planner
from fedsync.run.start import open_run
from fedsync.run.trust import Trust
from fedsync.storage.markers import FORMAT_VERSION, Assignment, Summary, WorkerInfo, WorkerTask, parse, to_dict
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message
from fedsync.tensors.files import save_state

from .helpers import (
    coordinator_identity,
    finish,
    killed_on_error,
    run,
    start,
    submit_update,
    worker_identity,
    write_yaml,
)
from .image_files import CLASSES, digits_images, two_workers_and_a_test_set, write_folders

DIGITS = ImageSpec(tuple(CLASSES), 8, 1)
IMAGE_SETS = ["--set", "task=imagefolder", "--set", "model=image_cnn", "--set", f"classes={CLASSES}",
              "--set", "image_size=8", "--set", "channels=1"]


def _write(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(folder / name)
    return folder / name


def _loaded(root: Path, budget: int | None = None, notes: list[str] | None = None) -> Split | Stream:
    return load_folder(root, DIGITS, budget, (notes if notes is not None else []).append)


def test_a_class_index_is_its_place_in_the_config_whatever_classes_a_folder_holds(tmp_path: Path) -> None:
    pixels, labels = digits_images()
    for i in np.flatnonzero((labels == 3) | (labels == 7))[:20]:
        _write(tmp_path / str(labels[i]), f"{i}.png", pixels[i])
    data = _loaded(tmp_path)
    assert isinstance(data, Split) and tuple(data.x.shape[1:]) == (1, 8, 8)
    assert set(data.y.tolist()) == {3, 7}  # not 0 and 1, as ImageFolder's own mapping would make them
    assert float(data.x.min()) >= -1.0 and float(data.x.max()) <= 1.0


def test_a_class_the_run_does_not_know_or_an_empty_folder_is_refused(tmp_path: Path) -> None:
    pixels, _ = digits_images()
    _write(tmp_path / "3", "a.png", pixels[0])
    _write(tmp_path / "cat", "b.png", pixels[1])
    with pytest.raises(DataError, match="class folder.*cat.*the run does not know"):
        _loaded(tmp_path)
    with pytest.raises(DataError, match="holds no image of the run's classes"):
        _loaded(tmp_path / "cat")  # images, but none in a class folder
    with pytest.raises(DataError, match="does not exist"):
        _loaded(tmp_path / "absent")


@pytest.mark.parametrize("budget", [None, 0], ids=["in memory", "streamed"])
def test_damaged_and_foreign_files_are_skipped_with_their_reason(tmp_path: Path, budget: int | None) -> None:
    pixels, _ = digits_images()
    for i in range(6):
        _write(tmp_path / "1", f"{i}.png", pixels[i])
    damaged = _write(tmp_path / "1", "damaged.png", pixels[6])
    damaged.write_bytes(damaged.read_bytes()[:30])  # cut short: the header promises more
    (tmp_path / "1" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(b"")
    (tmp_path / "1" / ".DS_Store").write_bytes(b"\0")  # hidden files are not anyone's data
    notes: list[str] = []
    data = _loaded(tmp_path, budget, notes)
    seen = sum(len(y) for _, y in data.epoch(4))
    said = " ".join(notes)
    assert seen == 6 and "notes.txt: not an image file" in said and "stray.png: not in a class folder" in said
    assert "damaged.png: cannot be decoded" in said and ".DS_Store" not in said


def test_a_stream_trains_exactly_like_the_same_images_in_memory(tmp_path: Path) -> None:
    """Streaming a folder too large for memory changes where the batches come from, not what is learned: the same
    order, the same batches, the same weights."""
    pixels, labels = digits_images()
    for i in range(96):
        _write(tmp_path / str(labels[i]), f"{i:03d}.png", pixels[i])
    memory, stream = _loaded(tmp_path), _loaded(tmp_path, budget=0)
    assert isinstance(memory, Split) and isinstance(stream, Stream) and len(stream) == 96
    task = load_config("digits", {"task": "imagefolder", "model": "image_cnn", "classes": CLASSES, "image_size": 8,
                                  "channels": 1}).resolved_task()
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None)
    trained = []
    for data in (memory, stream):
        model = task.build_model("image_cnn", seed=0)
        result = local_train(model, data, settings, "cpu", seed=5)
        trained.append((result.samples, result.steps, model.state_dict()))
    assert trained[0][:2] == trained[1][:2] == (96, 12)
    for k, v in trained[0][2].items():
        assert torch.allclose(v, trained[1][2][k], atol=1e-6), k


def test_the_config_shapes_the_task_and_says_what_is_missing() -> None:
    task = load_config("digits", {"task": "imagefolder", "model": "resnet18", "classes": ["cat", "dog", "fox"],
                                  "image_size": 32, "channels": 3}).resolved_task()
    assert task.private and task.num_classes == 3 and task.input_shape == (3, 32, 32)
    assert task.build_model("resnet18")(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ConfigError, match="imagefolder needs classes, image_size"):
        load_config("digits", {"task": "imagefolder", "model": "image_cnn", "channels": 1})
    with pytest.raises(ConfigError, match="task digits fixes its own classes"):
        load_config("digits", {"classes": ["a", "b"]})
    with pytest.raises(ConfigError, match="augment 'sideways' is not true, false or one of crop, flip"):
        load_config("digits", {"augment": "sideways"})
    with pytest.raises(DataError, match="give its folder with --data DIR"):
        task.load_own(None, DataOptions(seed=0, test_fraction=0.2, verify_checksums=True))


def test_a_worker_on_its_own_data_may_claim_no_more_examples_than_it_registered(tmp_path: Path) -> None:
    """Its registered count, copied into the signed assignment, bounds the FedAvg weight it claims: with no shards
    there is no training-set size to check against."""
    s = Share(tmp_path)
    cfg = load_config("digits", {"task": "imagefolder", "model": "image_cnn", "classes": CLASSES, "image_size": 8,
                                 "channels": 1})
    coordinator = coordinator_identity()
    run_id = open_run(s, cfg, "coordinator", coordinator).run_id
    ref = save_state(s.store.write, s.global_model(1), {"w": torch.zeros(3)})
    a = Assignment(format=FORMAT_VERSION, run_id=run_id, round=1, rounds=1, model=ref, num_shards=0, time_budget_s=5.0,
                   workers={w: WorkerTask(shard=None, local_epochs=1, samples=100) for w in ("honest", "boaster")},
                   shards=None)
    a.signature = coordinator.sign(assignment_message(a))
    s.make_folder(s.updates_dir(1))
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    assert s.read_record(Assignment, s.assignment(1)).workers["honest"].samples == 100  # written and read back
    submit_update(s, a, "honest", {"w": torch.ones(3)}, samples=100)
    submit_update(s, a, "boaster", {"w": torch.ones(3)}, samples=101)
    trust = Trust(s, run_id, coordinator, "tofu", lambda n: worker_identity(n).public, print)
    assert trust.admit("honest") and trust.admit("boaster")
    planner = Planner(s, load_config("digits"), None, None, None, print)  # type: ignore[arg-type]
    ledger = RoundLedger(s, 1, a, bounds=planner.bound, rule=FedAvg(), trust=trust, sealed=cfg.confidential_updates)
    assert [c.worker for c in ledger.scan()] == ["honest"]
    assert ledger.rejected["boaster"].reason == "bad_samples" and "boaster registered 100" in ledger.rejected[
        "boaster"].detail


@pytest.mark.processes
def test_two_workers_train_on_their_own_images_and_reach_090_in_10_rounds(tmp_path: Path, share: Path) -> None:
    """The digits as PNG files: the coordinator's test folder and two workers' own folders with different class
    mixes, one of them streamed from disk. No image enters the share; the assignment says each worker trains on its
    own data, with the count it registered."""
    counts = write_folders(tmp_path / "data", two_workers_and_a_test_set)
    data = tmp_path / "data"
    refused = run("coordinator", "--share", str(share), *IMAGE_SETS, "--rounds", "1")
    assert refused.returncode == 6 and "--data DIR" in refused.stderr and not any(share.iterdir()), refused.stderr
    sets = [*IMAGE_SETS, "--set", "min_workers=2", "--set", "local_epochs=2"]
    coord = start("coordinator", "--share", str(share), *sets, "--rounds", "10", "--data", str(data / "test"))
    a = start("worker", "--share", str(share), "--name", "a", "--device", "cpu", "--wait-for-run", "60",
              "--data", str(data / "a"))
    b = start("worker", "--share", str(share), "--name", "b", "--device", "cpu", "--wait-for-run", "60",
              "--data", str(data / "b"), "--data-memory", "0", "--log-json")
    with killed_on_error(coord, a, b):
        _write(tmp_path / "stranger" / "cat", "0.png", digits_images()[0][0])
        stranger = run("worker", "--share", str(share), "--name", "c", "--device", "cpu", "--wait-for-run", "60",
                       "--data", str(tmp_path / "stranger"))
        out = finish(coord, timeout=400)
        outs, bout = finish(a, timeout=60), finish(b, timeout=60)
    events = [json.loads(line) for line in bout.splitlines()]  # --log-json: one object per event, nothing else
    assert {e["role"] for e in events} == {"worker b"} and any("round 10: trained" in e["message"] for e in events)
    outs += bout
    assert coord.returncode == 0 and a.returncode == 0 and b.returncode == 0, out + outs
    assert stranger.returncode == 6 and "cat that the run does not know" in stranger.stderr, stranger.stderr
    s = Share(share)
    assignment = s.read_record(Assignment, s.assignment(10))
    assert assignment.shards is None and assignment.num_shards == 0
    assert {w: (t.shard, t.samples) for w, t in assignment.workers.items()} == {"a": (None, counts["a"]),
                                                                                "b": (None, counts["b"])}
    summary = parse(Summary, s.read_yaml(s.summary(10)), "summary")
    assert {e.worker: e.samples for e in summary.accepted} == {"a": counts["a"], "b": counts["b"]}
    accuracy = float(s.path(s.metrics).read_text().strip().splitlines()[-1].split(",")[1])
    assert accuracy >= 0.9, out
    assert [p for p in share.rglob("*.png")] == [share / "report.png"] and "skipped" not in outs  # no image of theirs
    last = list(csv.DictReader(s.path(s.metrics).open()))[-1]
    assert datetime.fromisoformat(last["closed_at"]).tzinfo is not None and int(last["up_bytes"]) > 0
    assert datetime.fromisoformat(s.read_record(WorkerInfo, s.worker_file("a")).written_at or "").year >= 2026
    status = run("status", "--share", str(share))
    assert f"trains on {counts['a']} examples of its own" in status.stdout, status.stdout + status.stderr
