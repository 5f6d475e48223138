"""CIFAR-10 through torchvision's real loader, from a small fabricated set in the real on-disk format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedsync.base.errors import DataError
from fedsync.learning.data import load_cifar10
from fedsync.storage.markers import FinalMarker, Summary, parse
from fedsync.storage.share import Share

from .cifar_files import PER_BATCH, fabricate_cifar10
from .helpers import finish, start


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


@pytest.mark.processes
def test_one_round_of_resnet18_over_the_share_with_data_at_each_machines_own_path(tmp_path: Path,
                                                                                    share: Path) -> None:
    """The coordinator's copy and the worker's sit at different paths (a MacBook and a Linux box): each names its
    own with --data-root; the run's config holds neither, so the worker could not have used the coordinator's."""
    fabricate_cifar10(tmp_path / "mac" / "data")
    shutil.copytree(tmp_path / "mac" / "data", tmp_path / "linux" / "data")
    sets = ["--set", "verify_checksums=false", "--set", "batch_size=40"]
    coord = start("coordinator", "--share", str(share), "--config", "cifar10", "--rounds", "1", *sets,
                  "--data-root", str(tmp_path / "mac" / "data"))
    worker = start("worker", "--share", str(share), "--name", "gpu-box", "--device", "cpu", "--wait-for-run", "60",
                   "--data-root", str(tmp_path / "linux" / "data"))
    out = finish(coord, timeout=240)
    wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    s = Share(share)
    summary = parse(Summary, s.read_yaml(s.summary(1)), "s")
    assert [a.worker for a in summary.accepted] == ["gpu-box"] and summary.accepted[0].samples == 5 * PER_BATCH
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "f").round == 1
    assert s.path(s.final_model).stat().st_size > 40_000_000  # ResNet-18's 11 M float32 parameters
