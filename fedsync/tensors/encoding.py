"""Update encodings: how a worker writes its delta (the run's `compression`), and how a reader gets the values
back. The byte layout is docs/PROTOCOL.md section 5.13; in short, every floating tensor T of the model is written

- `none`: as the model's dtype (F32 for the built-in models);
- `bf16`: as BF16 (round to nearest even);
- `int8`: as I8 values q of T's shape plus the F32 tensor `T#scale` of ceil(n / BLOCK) scales, one per block of
  BLOCK consecutive elements of T flattened; element i reads q[i] x scale[i // BLOCK] in IEEE binary32. A block's
  scale is its largest magnitude / 127, so q is in [-127, 127] (0 for an all-zero block).

Integer tensors (BatchNorm's counts) are written as they are under every encoding. Lossy encodings leave an error
(what was meant minus what a reader gets); `residual` computes it so a worker can add it to its next update
(error feedback: Seide et al. 2014, Karimireddy et al. 2019, arXiv:1901.09847).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsync.storage.tensorfile import SCALE_SUFFIX, FileLayout

NONE = "none"
ENCODINGS = (NONE, "bf16", "int8")
BLOCK = 256  # int8: elements per scale; 1 + 4/256 bytes per element, 0.254 x the bytes of float32
QMAX = 127


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def encoded_layout(layout: FileLayout, encoding: str) -> FileLayout:
    """The tensors an update in `encoding` holds, for a model whose tensors are `layout` (safetensors dtype codes)."""
    if encoding == NONE:
        return layout
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (dtype, shape) in layout.items():
        if not dtype.startswith(("F", "BF")):
            out[name] = (dtype, shape)
        elif encoding == "bf16":
            out[name] = ("BF16", shape)
        else:
            n = 1
            for s in shape:
                n *= s
            out[scale_name(name)] = ("F32", (blocks(n),))
            out[name] = ("I8", shape)
    return out


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values (x's shape) and float32 block scales of one tensor."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.zeros(blocks(n) * BLOCK, dtype=torch.float32)
    padded[:n] = flat
    rows = padded.view(-1, BLOCK)
    scales = rows.abs().amax(dim=1) / QMAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (rows / safe[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q.view(-1)[:n].view(x.shape), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of int8 elements [0, len(q)) of a tensor whose first block is scales[0]: q x its block's scale.
    `out` (float32, at least len(q) elements) saves an allocation."""
    n = q.numel()
    values = out[:n] if out is not None else torch.empty(n, dtype=torch.float32)
    values.copy_(q.reshape(-1))
    full = n - n % BLOCK
    if full:
        values[:full].view(-1, BLOCK).mul_(scales[:full // BLOCK, None])
    if n > full:
        values[full:].mul_(scales[full // BLOCK])
    return values


def encode(update: Mapping[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """The tensors a worker writes for `update` in `encoding`."""
    if encoding == NONE:
        return dict(update)
    out: dict[str, torch.Tensor] = {}
    for name, t in update.items():
        if not t.is_floating_point():
            out[name] = t
        elif encoding == "bf16":
            out[name] = t.to(torch.bfloat16)
        else:
            out[name], out[scale_name(name)] = quantize(t)
    return out


def decode(tensors: Mapping[str, torch.Tensor], encoding: str, like: Mapping[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    """What a reader gets from encoded tensors, in the dtypes of `like` (the model's)."""
    if encoding == NONE:
        return {name: tensors[name] for name in like}
    out: dict[str, torch.Tensor] = {}
    for name, t in like.items():
        if not t.is_floating_point():
            out[name] = tensors[name]
        elif encoding == "bf16":
            out[name] = tensors[name].to(t.dtype)
        else:
            out[name] = dequantize(tensors[name], tensors[scale_name(name)]).view(t.shape).to(t.dtype)
    return out


def residual(meant: Mapping[str, torch.Tensor], written: Mapping[str, torch.Tensor], encoding: str
             ) -> dict[str, torch.Tensor]:
    """What encoding lost, per floating tensor, in float32: the part of `meant` a reader of `written` does not get."""
    got = decode(written, encoding, meant)
    return {name: meant[name].float() - got[name].float() for name, t in meant.items() if t.is_floating_point()}
