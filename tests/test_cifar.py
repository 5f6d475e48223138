"""CIFAR-10 through torchvision's real loader, from a small fabricated set in the real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from fedsync.base.errors import DataError
from fedsync.learning.data import load_cifar10
from fedsync.storage.markers import FinalMarker, Summary, parse
from fedsync.storage.share import Share

from .conftest import finish, start

PER_BATCH = 16


def fabricate_cifar10(root: Path, per_batch: int = PER_BATCH, seed: int = 0) -> None:
    """The 'python version' layout: five train batches, a test batch and batches.meta, pickled dicts with
    str keys (the real files were pickled by Python 2; torchvision loads them with encoding='latin1')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_missing_data_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, verify_checksums=True)


def test_fabricated_data_fails_the_real_md5_check_and_loads_without_it(tmp_path: Path) -> None:
    fabricate_cifar10(tmp_path)
    with pytest.raises(DataError, match="MD5"):
        load_cifar10(tmp_path, verify_checksums=True)
    ds = load_cifar10(tmp_path, verify_checksums=False)
    assert tuple(ds.train.x.shape) == (5 * PER_BATCH, 3, 32, 32) and len(ds.test) == PER_BATCH
    assert abs(float(ds.train.x.mean())) < 0.5  # normalised with CIFAR's channel statistics


def test_one_round_of_resnet18_over_the_share(tmp_path: Path, share: Path) -> None:
    fabricate_cifar10(tmp_path / "data")
    sets = ["--set", f"data_root={tmp_path / 'data'}", "--set", "verify_checksums=false", "--set", "batch_size=40"]
    coord = start("coordinator", "--share", str(share), "--config", "cifar10", "--rounds", "1", *sets)
    worker = start("worker", "--share", str(share), "--name", "gpu-box", "--device", "cpu", "--wait-for-run", "60")
    out = finish(coord, timeout=240)
    wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    s = Share(share)
    summary = parse(Summary, s.read_yaml(s.summary(1)), "s")
    assert [a.worker for a in summary.accepted] == ["gpu-box"] and summary.accepted[0].samples == 5 * PER_BATCH
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "f").round == 1
    assert s.path(s.final_model).stat().st_size > 40_000_000  # ResNet-18's 11 M float32 parameters
