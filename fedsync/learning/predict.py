"""A model run over inputs for an inference job: in batches sized for the device, in the precision the worker
trains in, with the inputs it cannot predict named with their reason instead of failing their chunk."""

from __future__ import annotations

import time

import torch
from torch import nn

from fedsync.learning.pace import Pace
from fedsync.learning.train import AUTOCAST, fits_on

MAX_BATCH = 8192
ACTIVATION_FACTOR = 64  # a batch's activations, as a multiple of its inputs' bytes, when sizing a GPU batch


def batch_size_for(device: str, example_bytes: int, configured: int) -> int:
    """The run's eval_batch_size on a CPU or MPS; on a CUDA GPU the largest power of two up to MAX_BATCH whose
    inputs and activations fit in half its free memory (large batches keep a GPU busy), at least `configured`."""
    if not device.startswith("cuda"):
        return configured
    size = MAX_BATCH
    while size > configured and not fits_on(device, size * example_bytes * ACTIVATION_FACTOR):
        size //= 2
    return max(size, configured)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which inputs hold only finite values (one bool per row)."""
    return torch.isfinite(x.reshape(len(x), -1)).all(dim=1)


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: str, precision: str = "fp32",
            channels_last: bool = False) -> torch.Tensor:
    """The model's logits for every row of `x` (float32, on the CPU). Rows with NaN or infinite values are run as
    zeros and come back as NaN logits, so one bad input never spoils its batch's others."""
    kind = device.split(":")[0]
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model.to(device, memory_format=memory_format).eval()
    good = finite_rows(x)
    if not bool(good.all()):
        x = torch.where(good.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype))
    pace = Pace(device)
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(kind, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            out.append(model(xb).float())
        pace.step()
    logits = torch.cat(out).cpu() if out else torch.empty(0, 0)
    logits[~good] = float("nan")
    return logits


def measure_inference(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: str, precision: str,
                      seconds: float = 0.3) -> float:
    """Inputs per second this device predicts at: batches of random inputs of one example's `shape` until `seconds`
    have passed, after one warm-up batch (the first call of every kernel). What routing sizes work by before the
    worker has run a chunk."""
    x = torch.rand(batch_size, *shape)
    predict(model, x, batch_size, device, precision)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict(model, x, batch_size, device, precision)
        done += batch_size
    return done / (time.perf_counter() - started)
