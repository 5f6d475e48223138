"""An inference job's inputs on the submitting machine, read in chunks and never whole: a safetensors file with a
tensor `x` (and optionally `ids`), a folder of image files, or a JSON lines file of prompts (for a task that writes
text). Larger than memory is fine: each chunk is read from the file when it is cut."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsync.base.errors import DataError
from fedsync.learning.imagefolder import EXTENSIONS
from fedsync.learning.text import prompt_record
from fedsync.storage.hashing import Hasher, hash_bytes
from fedsync.storage.reasons import Unusable
from fedsync.storage.tensorfile import ITEMSIZE, header_length, parse_header

FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
INTEGERS = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
HASH_PIECE = 8 << 20


@dataclass(frozen=True)
class TensorInputs:
    """A safetensors file: `x` (N, *input shape), any float dtype; `ids` (N,), integers, optional."""

    path: Path
    rows: int
    offset: int           # where the data section starts
    x: tuple[str, int, int]  # dtype code, start, bytes per row (within the data section)
    ids: tuple[str, int] | None  # dtype code, start
    example: tuple[int, ...]
    kind = "tensors"

    def identity(self) -> str:
        return _file_hash(self.path)

    def chunk(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Inputs start..stop-1 as float32, read from the file alone."""
        code, begin, row = self.x
        with open(self.path, "rb") as f:
            f.seek(self.offset + begin + start * row)
            data = bytearray(f.read((stop - start) * row))
        x = torch.frombuffer(data, dtype=FLOATS[code]).view(stop - start, *self.example)
        return {"x": x.float()}

    def ids_of(self, start: int, stop: int) -> list[str]:
        if self.ids is None:
            return [str(i) for i in range(start, stop)]
        code, begin = self.ids
        size = ITEMSIZE[code]
        with open(self.path, "rb") as f:
            f.seek(self.offset + begin + start * size)
            data = bytearray(f.read((stop - start) * size))
        return [str(v) for v in torch.frombuffer(data, dtype=INTEGERS[code]).tolist()]


@dataclass(frozen=True)
class ImageInputs:
    """A folder of image files (any depth), in sorted order of their paths relative to it."""

    path: Path
    files: tuple[str, ...]
    kind = "images"

    @property
    def rows(self) -> int:
        return len(self.files)

    def identity(self) -> str:
        """BLAKE3 of the listing: each file's relative path and size, one per line."""
        lines = "".join(f"{name}\t{os.path.getsize(self.path / name)}\n" for name in self.files)
        return hash_bytes(lines.encode())

    def chunk(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The files' bytes, one after another (`bytes`), and where each begins and ends (`offsets`, N + 1)."""
        return joined([(self.path / name).read_bytes() for name in self.files[start:stop]])

    def ids_of(self, start: int, stop: int) -> list[str]:
        return list(self.files[start:stop])


@dataclass(frozen=True)
class PromptInputs:
    """A JSON lines file of prompts, one per non-blank line, each checked when the file is opened; chunks hold
    the lines' bytes as they are in the file."""

    path: Path
    spans: np.ndarray  # (rows, 2): where each prompt's line starts and ends in the file
    kind = "prompts"

    @property
    def rows(self) -> int:
        return len(self.spans)

    def identity(self) -> str:
        return _file_hash(self.path)

    def _lines(self, start: int, stop: int) -> list[bytes]:
        first, last = int(self.spans[start, 0]), int(self.spans[stop - 1, 1])
        with open(self.path, "rb") as f:
            f.seek(first)
            data = f.read(last - first)
        return [data[a - first:b - first] for a, b in self.spans[start:stop].tolist()]

    def chunk(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The prompts' lines one after another (`bytes`) and where each begins and ends (`offsets`, N + 1)."""
        return joined(self._lines(start, stop))

    def ids_of(self, start: int, stop: int) -> list[str]:
        """Each prompt's `id`, else its index."""
        return [str(prompt_record(line).get("id", start + i)) for i, line in enumerate(self._lines(start, stop))]


Inputs = TensorInputs | ImageInputs | PromptInputs


def open_inputs(path: Path, input_shape: tuple[int, ...], takes_images: bool, takes_prompts: bool = False) -> Inputs:
    """The inputs at `path`, checked against the task's input shape before anything is cut: a DataError that says
    what is wrong, never a surprise in the middle of a job."""
    if takes_prompts:
        return _prompt_inputs(path)
    if path.is_dir():
        if not takes_images:
            raise DataError(f"{path} is a folder of images, and the run's task takes no image files: give a "
                            "safetensors file with a tensor x")
        files = tuple(sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                             if f.lower().endswith(EXTENSIONS) and not f.startswith(".")))
        if not files:
            raise DataError(f"{path} holds no image file ({', '.join(EXTENSIONS)})")
        return ImageInputs(path, files)
    if not path.is_file():
        raise DataError(f"inputs {path} do not exist: give a safetensors file with a tensor x, or a folder of images")
    return _tensor_inputs(path, input_shape)


def joined(blobs: list[bytes]) -> dict[str, torch.Tensor]:
    """Byte strings as one U8 tensor `bytes` and their bounds `offsets` (I64, N + 1): how chunks and outputs carry
    files and text (docs/PROTOCOL.md section 5.14)."""
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    data = b"".join(blobs)
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return {"bytes": tensor, "offsets": torch.from_numpy(offsets.astype(np.int64))}


def split(data: torch.Tensor, offsets: torch.Tensor, rows: int) -> list[bytes] | None:
    """The byte strings `joined` made, or None when the offsets do not cut `data` into `rows` of them."""
    bounds = offsets.tolist()
    if (data.dtype != torch.uint8 or offsets.dtype != torch.int64 or len(bounds) != rows + 1 or bounds[0] != 0
            or bounds[-1] != len(data) or any(b > a for a, b in zip(bounds[1:], bounds))):
        return None
    raw = data.numpy().tobytes()
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def _file_hash(path: Path) -> str:
    """BLAKE3 of a file's bytes, read in pieces."""
    h = Hasher()
    with open(path, "rb") as f:
        while piece := f.read(HASH_PIECE):
            h.update(piece)
    return h.hexdigest()


def _prompt_inputs(path: Path) -> PromptInputs:
    if not path.is_file():
        raise DataError(f"prompts {path} do not exist: the run's task writes text; give a JSON lines file, one "
                        '{"prompt": ...} or {"messages": [...]} per line')
    spans = []
    with open(path, "rb") as f:
        at = 0
        for number, line in enumerate(f, 1):
            body = line.rstrip(b"\r\n")
            if body.strip():
                try:
                    prompt_record(body)
                except ValueError as e:
                    raise DataError(f"{path}:{number}: {e}") from None
                spans.append((at, at + len(body)))
            at += len(line)
    if not spans:
        raise DataError(f"{path} holds no prompt: one JSON object per line, with `prompt` or `messages`")
    return PromptInputs(path, np.array(spans, dtype=np.int64))


def _tensor_inputs(path: Path, input_shape: tuple[int, ...]) -> TensorInputs:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        try:
            n = header_length(prefix, size)
            specs = {s.name: s for s in parse_header(f.read(n), size - 8 - n)}
        except Unusable as e:
            raise DataError(f"{path} is not a safetensors file: {e.detail}") from None
    x = specs.get("x")
    if x is None:
        raise DataError(f"{path} has no tensor named x (it holds {', '.join(sorted(specs)) or 'none'}): put the "
                        "inputs in x, shaped (N, " + ", ".join(map(str, input_shape)) + ")")
    if x.dtype not in FLOATS:
        raise DataError(f"{path}: x is {x.dtype}; the model takes floating-point inputs (F32, F16, BF16, F64)")
    if tuple(x.shape[1:]) != tuple(input_shape) or not x.shape or x.shape[0] < 1:
        raise DataError(f"{path}: x is shaped {list(x.shape)}; the run's model takes (N, "
                        + ", ".join(map(str, input_shape)) + ") with N >= 1")
    rows = x.shape[0]
    ids = specs.get("ids")
    if ids is not None and (ids.dtype not in INTEGERS or ids.shape != (rows,)):
        raise DataError(f"{path}: ids is {ids.dtype} {list(ids.shape)}; expected integers shaped [{rows}]")
    return TensorInputs(path, rows, 8 + n, (x.dtype, x.start, (x.end - x.start) // rows),
                        None if ids is None else (ids.dtype, ids.start), tuple(input_shape))


def cut(inputs: Inputs, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk, in order."""
    for start in range(0, inputs.rows, chunk_rows):
        yield start, min(start + chunk_rows, inputs.rows)
