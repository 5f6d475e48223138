"""The safetensors format as the share holds it, read without torch: the header's length prefix, the JSON header
(tensor names, dtypes, shapes, byte offsets) and the check that an update holds exactly the global model's
tensors. The tensors themselves are read in pieces by fedsync/aggregation/intake.py.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.store import Reader, read_exact

MAX_HEADER_BYTES = 16 << 20
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1}

SCALE_SUFFIX = "#scale"  # int8: the scales of tensor T are the tensor T#scale ('#' is in no torch state-dict key)
FileLayout = Mapping[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype code, shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype code: F32, BF16, I64, ...
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section, which begins after the header
    end: int


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
            dtype = info["dtype"]
            itemsize = ITEMSIZE[dtype]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Unusable(Reason.NOT_SAFETENSORS, f"tensor {name!r} has a malformed header entry") from None
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


def read_header(f: Reader) -> tuple[int, list[TensorSpec]]:
    """A whole file's header, read from its start: where its data section begins, and its tensors. Unusable when it
    is not a safetensors file (SIZE_MISMATCH when the file ends early)."""
    prefix = bytearray(8)
    read_exact(f, memoryview(prefix))
    header = bytearray(header_length(bytes(prefix), f.size))
    read_exact(f, memoryview(header))
    return 8 + len(header), parse_header(bytes(header), f.size - 8 - len(header))


def check_layout(specs: list[TensorSpec], expected: FileLayout, dtype_names: Mapping[str, str] | None = None) -> None:
    """The update must hold exactly the global model's tensors, with the same shapes and dtypes (`dtype_names`
    spells dtype codes in messages the way the reader's framework does)."""
    spell = dtype_names or {}
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
            raise Unusable(Reason.WRONG_DTYPE, f"{name}: {spell.get(s.dtype, s.dtype)}, expected "
                                               f"{spell.get(dtype, dtype)}")
