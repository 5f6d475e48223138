"""Datasets as tensors in memory: the embedded digits set and CIFAR-10 from the user's own folder."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedsync.base.errors import DataError

CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Split:
    """Inputs as float32 (N, C, H, W), normalised; labels as int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def subset(self, idx: np.ndarray) -> Split:
        index = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[index], self.y[index])

    def epoch(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
        """One pass in batches: shuffled by `generator` (on the split's device, so the order never leaves it), or in
        order without one."""
        n = len(self.y)
        order = None if generator is None else torch.randperm(n, generator=generator, device=self.x.device)
        for start in range(0, n, batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


def first(data: Source, n: int) -> Source:
    """The first n examples (all of them when there are fewer)."""
    return data.subset(np.arange(min(n, len(data))))


class Source(Protocol):
    """Examples a worker trains on or a coordinator evaluates on: a Split in memory, or a stream read from files
    batch by batch (fedsync/learning/imagefolder.py) when they do not fit in memory."""

    @property
    def device(self) -> torch.device: ...

    def __len__(self) -> int: ...

    def subset(self, idx: np.ndarray) -> Source: ...

    def epoch(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor,
                                                                                                torch.Tensor]]: ...


@dataclass
class Dataset:
    train: Split
    test: Split
    num_classes: int
    train_index: np.ndarray | None = None  # each training row's place in the task's whole data; None: 0, 1, 2, ...

    def canonical(self) -> np.ndarray:
        """Each training row's index in the task's data as its loader defines the order (PROTOCOL.md 5.4): what
        shard lists name, so that a worker needs no random generator to find its examples."""
        return np.arange(len(self.train)) if self.train_index is None else self.train_index


def load_digits(seed: int, test_fraction: float) -> Dataset:
    """scikit-learn's bundled 1,797 8x8 digits, pixel values 0..16 scaled to 0..1, a seeded held-out split."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits needs 0 < test_fraction < 1, got {test_fraction}")
    with gzip.open(digits_file()) as f:
        raw = np.loadtxt(f, delimiter=",")  # 64 pixel columns, then the label
    x = torch.tensor(raw[:, :-1], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(raw[:, -1].astype(np.int64), dtype=torch.long)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(Split(x[train], y[train]), Split(x[test], y[test]), num_classes=10, train_index=train.numpy())


def digits_file() -> Path:
    """The file sklearn.datasets.load_digits reads, found without importing scikit-learn: that import costs every
    coordinator and worker about 1.5 s of CPU at start (more than the rest of its start-up but torch)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError(f"scikit-learn's bundled digits.csv.gz is not where it should be ({path}): "
                        "reinstall scikit-learn (python -m pip install --force-reinstall scikit-learn)")
    return path


def load_cifar10(root: Path, verify_checksums: bool) -> Dataset:
    """CIFAR-10's python batches through torchvision's own loader (which checks their MD5 sums)."""
    folder = root / "cifar-10-batches-py"
    absent = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if absent:
        raise DataError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(absent)}. Download 'CIFAR-10 python version' "
            "(cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into "
            f"{root}, or set data_root in the config to the folder that holds cifar-10-batches-py/")
    cls = _cifar_class(verify_checksums)
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise DataError(f"CIFAR-10 under {folder} failed torchvision's MD5 check ({e}); the files are damaged "
                        "or not the official release: extract cifar-10-python.tar.gz again") from None
    return Dataset(_cifar_split(train), _cifar_split(test), num_classes=10)


def _cifar_class(verify_checksums: bool) -> type:
    """torchvision's CIFAR10, or, for fabricated test data only (`verify_checksums: false`), a subclass
    whose MD5 sums are cleared: torchvision's check_integrity then checks only that each file exists, and
    the rest of its loading code runs unchanged."""
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


def _cifar_split(ds: object) -> Split:
    x = torch.tensor(ds.data).permute(0, 3, 1, 2).float().div_(255.0)  # type: ignore[attr-defined]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return Split((x - mean) / std, torch.tensor(ds.targets, dtype=torch.long))  # type: ignore[attr-defined]
