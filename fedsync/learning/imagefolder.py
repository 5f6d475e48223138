"""Image folders that stay on their machine: the built-in `imagefolder` task's data, in torchvision's ImageFolder
layout `DIR/<class>/<image>`. The run fixes the class names, so every machine maps a class to the same index; each
image is decoded, converted to the run's channels, resized to the run's size and scaled to [-1, 1]
(docs/PROTOCOL.md section 5.4). A folder whose decoded images fit in this machine's memory budget is decoded once
and kept as a Split; a larger one is streamed, decoded batch by batch in DataLoader processes every pass.

An image that cannot be decoded is skipped with its reason (kept in `skipped` and said by the caller), never a
crash in the middle of a round.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from fedsync.base.errors import DataError
from fedsync.base.machine import cores, free_memory
from fedsync.learning.data import Split

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's own
DECODE_BATCH = 256


@dataclass(frozen=True)
class ImageSpec:
    """What the run's config fixes about its images."""

    classes: tuple[str, ...]  # class folder names; a class's index is its place here
    size: int                 # images are resized to size x size
    channels: int             # 1: greyscale, 3: RGB

    def decoded_bytes(self, n: int) -> int:
        return n * self.channels * self.size * self.size * 4


Note = Callable[[str], None]


@dataclass
class Folder:
    """A folder's images as the run sees them: (path, class index) in a fixed order (class, then file name), and
    what was skipped with the reason (each said once through `note`)."""

    spec: ImageSpec
    files: list[tuple[str, int]]
    note: Note
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it is not used

    def skip(self, found: dict[str, str]) -> None:
        new = {p: why for p, why in found.items() if p not in self.skipped}
        if new:
            self.skipped.update(new)
            shown = "; ".join(f"{p}: {why}" for p, why in list(new.items())[:3])
            self.note(f"skipped {len(new)} file(s) of the image folder: {shown}{' …' if len(new) > 3 else ''}")


def scan(root: Path, spec: ImageSpec, note: Note) -> Folder:
    """The images under `root`, refused when the folder holds a class the run does not know (it would be trained
    as nothing, or the wrong thing) or no image at all."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder: give the folder that holds one "
                        "sub-folder per class (DIR/<class>/<image>) with --data")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    unknown = [p.name for p in entries if p.is_dir() and p.name not in spec.classes]
    if unknown:
        raise DataError(f"{root} holds class folder(s) {', '.join(unknown)} that the run does not know (its classes: "
                        f"{', '.join(spec.classes)}): move them out, or start a run whose config lists them")
    folder, skipped = Folder(spec, [], note), {str(p): "not in a class folder" for p in entries if not p.is_dir()}
    for index, name in enumerate(spec.classes):
        for dirpath, _, filenames in sorted(os.walk(root / name)):  # by folder, then file name
            for f in sorted(filenames):
                path = os.path.join(dirpath, f)
                if f.startswith("."):
                    continue
                if f.lower().endswith(EXTENSIONS):
                    folder.files.append((path, index))
                else:
                    skipped[path] = "not an image file (" + ", ".join(EXTENSIONS) + ")"
    folder.skip(skipped)
    if not folder.files:
        raise DataError(f"{root} holds no image of the run's classes ({', '.join(spec.classes)}): expected "
                        f"{root}/<class>/<image>")
    return folder


class Images(TorchDataset):
    """One decoded image per index, as (x, class index, index, why it failed or "")."""

    def __init__(self, folder: Folder) -> None:
        self.files, self.spec = folder.files, folder.spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, str]:
        path, label = self.files[i]
        s, c = self.spec.size, self.spec.channels
        try:
            x = decode(path, s, c)
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a damaged or foreign file
            return torch.zeros(c, s, s), label, i, f"{type(e).__name__}: {e}"
        return scale(x), label, i, ""


def decode(source: str | io.BytesIO, size: int, channels: int) -> torch.Tensor:
    """One image file (a path, or its bytes) as uint8 (channels, size, size): converted to greyscale (Pillow's
    mode L) or RGB, resized bilinearly without keeping the aspect ratio (docs/PROTOCOL.md section 5.4). Pillow's
    own exception when it cannot."""
    from PIL import Image

    with Image.open(source) as image:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB")
                            .resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).view(size, size, channels).permute(2, 0, 1)


def scale(x: torch.Tensor) -> torch.Tensor:
    """imagefolder's inputs: 8-bit pixels as x / 127.5 - 1, in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


class Stream:
    """A folder's images read and decoded batch by batch, for folders larger than the memory budget."""

    device = torch.device("cpu")

    def __init__(self, folder: Folder, rows: np.ndarray | None = None, loaders: int | None = None) -> None:
        self.folder, self.images = folder, Images(folder)
        self.rows = np.arange(len(folder.files)) if rows is None else rows
        self.loaders = loaders if loaders is not None else decode_processes()

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: np.ndarray) -> Stream:
        return Stream(self.folder, self.rows[idx], self.loaders)

    def epoch(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
        order = self.rows if generator is None else self.rows[torch.randperm(len(self.rows), generator=generator)]
        yield from decoded(self.folder, self.images, order.tolist(), batch_size, self.loaders)


def decoded(folder: Folder, images: Images, order: list[int], batch_size: int,
            loaders: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the images at `order`, decoded in `loaders` processes; those that fail are left out of their
    batch and recorded in folder.skipped."""
    loader = DataLoader(images, batch_size=batch_size, sampler=order, num_workers=loaders,
                        pin_memory=torch.cuda.is_available())
    for x, y, index, errors in loader:
        if any(errors):
            folder.skip({folder.files[i][0]: f"cannot be decoded ({why})"
                         for i, why in zip(index.tolist(), errors) if why})
            keep = torch.tensor([not e for e in errors])
            x, y = x[keep], y[keep]
        if len(y):
            yield x, y


def load_folder(root: Path, spec: ImageSpec, memory_budget: int | None, note: Note) -> Split | Stream:
    """The folder's images: decoded once into memory when they fit in `memory_budget` bytes (None: a quarter of
    the memory this machine has free), else a Stream; what is skipped is said through `note`."""
    folder = scan(root, spec, note)
    budget = memory_budget if memory_budget is not None else free_memory() // 4
    if spec.decoded_bytes(len(folder.files)) > budget:
        return Stream(folder)
    xs, ys = [], []
    for x, y in decoded(folder, Images(folder), list(range(len(folder.files))), DECODE_BATCH, decode_processes()):
        xs.append(x)
        ys.append(y)
    if not ys:
        raise DataError(f"none of the {len(folder.files)} images under {root} could be read: "
                        + "; ".join(f"{p}: {why}" for p, why in list(folder.skipped.items())[:3]))
    return Split(torch.cat(xs), torch.cat(ys).long())


def decode_processes() -> int:
    """DataLoader processes that decode images: a few, leaving one core to the training loop."""
    return max(0, min(4, cores() - 1))
