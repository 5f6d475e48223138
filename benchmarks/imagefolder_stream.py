"""Training on a worker's own image folder: decoded once into memory (the baseline) against streamed from disk batch
by batch (what a folder larger than the memory budget gets), same images, same model, same steps.

The digits written as PNG files at 32x32 RGB (1,797 images), image_cnn, 2 passes, batch 64, on the CPU; then the
decode alone. Prints samples/s for each and the ratio.

Usage: python benchmarks/imagefolder_stream.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync.learning.imagefolder import ImageSpec, decode_processes, load_folder  # noqa: E402
from fedsync.learning.train import TrainSettings, local_train  # noqa: E402
from fedsync.run.config import load_config  # noqa: E402
from tests.image_files import CLASSES, digits_images  # noqa: E402

SIZE, CHANNELS = 32, 3


def write_images(root: Path) -> None:
    pixels, labels = digits_images()
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.fromarray(image).convert("RGB").resize((SIZE, SIZE)))).save(
            folder / f"{i:04d}.png")


def main() -> None:
    spec = ImageSpec(tuple(CLASSES), SIZE, CHANNELS)
    cfg = load_config("digits", {"task": "imagefolder", "model": "image_cnn", "classes": CLASSES,
                                 "image_size": SIZE, "channels": CHANNELS})
    task = cfg.resolved_task()
    settings = TrainSettings(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root)
        started = time.perf_counter()
        memory = load_folder(root, spec, None, print)
        decode_s = time.perf_counter() - started
        stream = load_folder(root, spec, 0, print)
        rates = {}
        for name, data in (("in memory", memory), ("streamed", stream)):
            model = task.build_model("image_cnn", seed=0)
            local_train(model, data.subset(np.arange(128)), settings, "cpu", seed=0)  # first-call warm-up
            result = local_train(model, data, settings, "cpu", seed=1)
            rates[name] = result.samples_per_s
    n = len(memory)
    print(f"{n} images {SIZE}x{SIZE}x{CHANNELS}, image_cnn, 2 passes, batch 64, cpu, {decode_processes()} decoding "
          f"process(es)")
    print(f"decode once into memory: {decode_s:.2f} s ({n / decode_s:.0f} images/s)")
    for name, rate in rates.items():
        print(f"training {name}: {rate:.0f} samples/s")
    print(f"streamed / in memory: {rates['streamed'] / rates['in memory']:.2f}")


if __name__ == "__main__":
    main()
