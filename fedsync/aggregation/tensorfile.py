"""safetensors files in the share: written whole with their hash, read back only after verifying it.

Files are read into memory, never memory-mapped: on a network filesystem a mapped file that changes under
the reader kills the process with SIGBUS instead of raising an error.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.share import atomic_write, hash_bytes, read_verified

MAX_HEADER_BYTES = 16 << 20
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section, which begins after the header
    end: int


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def header_length(prefix: bytes, file_size: int) -> int:
    """The JSON header's length from the 8-byte little-endian prefix, bounded before anything is read."""
    if len(prefix) < 8:
        raise Unusable(Reason.NOT_SAFETENSORS, "shorter than the 8-byte safetensors prefix")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise Unusable(Reason.NOT_SAFETENSORS, f"implausible safetensors header length {n}")
    return n


def parse_header(header: bytes, data_size: int) -> list[TensorSpec]:
    """Tensor specs in data order; the data section must be exactly covered by them, no gaps, no overlap."""
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unusable(Reason.NOT_SAFETENSORS, f"header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise Unusable(Reason.NOT_SAFETENSORS, "header is not a JSON object")
    specs = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Unusable(Reason.NOT_SAFETENSORS, f"tensor {name!r} has a malformed header entry") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - start != math.prod(shape) * itemsize:
            raise Unusable(Reason.NOT_SAFETENSORS, f"tensor {name!r}: offsets do not match shape and dtype")
        specs.append(TensorSpec(name, dtype, shape, start, end))
    specs.sort(key=lambda s: s.start)
    position = 0
    for s in specs:
        if s.start != position:
            raise Unusable(Reason.NOT_SAFETENSORS, f"tensor {s.name!r} does not start where the previous ends")
        position = s.end
    if position != data_size:
        raise Unusable(Reason.NOT_SAFETENSORS, f"tensors cover {position} of {data_size} data bytes")
    return specs


def check_layout(specs: list[TensorSpec], expected: Layout) -> None:
    """The update must hold exactly the global model's tensors, with the same shapes and dtypes."""
    found = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise Unusable(Reason.MISSING_TENSOR, f"missing {', '.join(missing[:5])}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise Unusable(Reason.EXTRA_TENSOR, f"unexpected {', '.join(extra[:5])}")
    for name, (dtype, shape) in expected.items():
        s = found[name]
        if s.shape != shape:
            raise Unusable(Reason.WRONG_SHAPE, f"{name}: shape {list(s.shape)}, expected {list(shape)}")
        if s.dtype != dtype:
            raise Unusable(Reason.WRONG_DTYPE, f"{name}: {s.dtype}, expected {dtype}")


def save_state(path: Path, state: Mapping[str, torch.Tensor], ref_name: str | None = None,
               write: Callable[[Path, bytes], None] = atomic_write) -> FileRef:
    """Write tensors whole (with `write`: a share's own, in a run) and return the reference a marker records
    (file name relative to its folder)."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    write(path, data)
    return FileRef(file=ref_name or path.name, blake3=hash_bytes(data), bytes=len(data))


def load_verified(path: Path, ref: FileRef) -> dict[str, torch.Tensor]:
    data = read_verified(path, ref)
    try:
        return st_load(data)
    except Exception as e:  # the library reports malformed files with several exception types
        raise Unusable(Reason.NOT_SAFETENSORS, f"{path.name}: {e}") from None
