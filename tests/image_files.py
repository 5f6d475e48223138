"""The digits as PNG files in torchvision's ImageFolder layout (DIR/<class>/<image>): real images on disk for the
imagefolder task, split into machines' own folders with different class mixes."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fedsync.learning.data import digits_file

CLASSES = [str(d) for d in range(10)]


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as 8x8 greyscale bytes (0..16 scaled to 0..255), and their labels."""
    with gzip.open(digits_file()) as f:
        raw = np.loadtxt(f, delimiter=",")
    pixels = np.round(raw[:, :-1] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    return pixels, raw[:, -1].astype(np.int64)


def write_folders(root: Path, owner: Callable[[int, int], str]) -> dict[str, int]:
    """Every digit written as root/<owner(i, label)>/<label>/<i>.png; the images written per folder."""
    pixels, labels = digits_images()
    counts: dict[str, int] = {}
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / owner(i, int(label)) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
        counts[owner(i, int(label))] = counts.get(owner(i, int(label)), 0) + 1
    return counts


def two_workers_and_a_test_set(i: int, label: int) -> str:
    """A fifth of the images (every fifth) for the coordinator's test folder; of the rest, worker a holds digits 0-4
    and a quarter of 5-9, worker b the others: each worker sees every class, in a skewed mix."""
    if i % 5 == 0:
        return "test"
    if label < 5:
        return "a" if i % 8 else "b"
    return "b" if i % 4 else "a"
