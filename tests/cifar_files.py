"""A small CIFAR-10 in the real on-disk format ("python version"), for tests and benchmarks: no dataset can be
downloaded, and torchvision's real loader must still read it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

PER_BATCH = 16


def fabricate_cifar10(root: Path, per_batch: int = PER_BATCH, seed: int = 0, test: int | None = None) -> None:
    """Five train batches of `per_batch` images, a test batch of `test` (default `per_batch`) and batches.meta,
    pickled dicts with str keys (the real files were pickled by Python 2; torchvision loads them with
    encoding='latin1')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sizes = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test or per_batch}
    for name, n in sizes.items():
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
