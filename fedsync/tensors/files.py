"""Tensors to and from the share's safetensors files (fedsync/storage/tensorfile.py is the format without torch):
written whole with their hash, read back only after verifying it.

Files are read into memory, never memory-mapped: on a network filesystem a mapped file that changes under
the reader kills the process with SIGBUS instead of raising an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.share import Share
from fedsync.storage.tensorfile import FileLayout

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)

SPELLING = {code: str(dtype) for code, dtype in DTYPES.items()}  # how messages name dtypes: torch.float32

def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def file_layout(layout: Layout) -> FileLayout:
    """The same layout as a safetensors header spells it."""
    return {k: (CODES[dtype], shape) for k, (dtype, shape) in layout.items()}


def state_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors as a safetensors file's bytes (with `metadata`, the header's string-to-string `__metadata__`)."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)


def save_state(write: Callable[[str, bytes], None], name: str, state: Mapping[str, torch.Tensor],
               ref_name: str | None = None, seal: Callable[[bytes], bytes] | None = None) -> FileRef:
    """Write tensors whole under `name` with `write` (a Share's, in a run) and return the reference a marker
    records (by default the file's name relative to its folder): the hash and size of the bytes written, sealed by
    `seal` first when given."""
    data = state_bytes(state)
    if seal is not None:
        data = seal(data)
    digest: list[str] = []
    hashing = threading.Thread(target=lambda: digest.append(hash_bytes(data)), name="hash")
    hashing.start()  # beside the write: BLAKE3 runs without the GIL
    try:
        write(name, data)
    finally:
        hashing.join()
    return FileRef(file=ref_name or names.basename(name), blake3=digest[0], bytes=len(data))


def load_verified(share: Share, name: str, ref: FileRef) -> dict[str, torch.Tensor]:
    data = share.read_verified(name, ref)
    try:
        return st_load(data)
    except Exception as e:  # the library reports malformed files with several exception types
        raise Unusable(Reason.NOT_SAFETENSORS, f"{names.basename(name)}: {e}") from None
