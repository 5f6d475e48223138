"""Samples/s of the fedsync worker's local training (fedsync.learning.train.local_train, as the worker calls it) on
CIFAR-10-shaped data with the cifar10 config's model and batch size, beside a bare PyTorch loop of the same
model, batch size and precision on the same device, in the same run (alternating, best of REPEATS each).

On a CUDA GPU it also measures the ceiling: the bare loop with the model captured in CUDA graphs
(torch.compile, mode reduce-overhead), and fedsync's loop with the worker's own capture
(fedsync/learning/capture.py), each compiled once (compile time printed). Goal: fedsync captured >= 0.8x the
ceiling at batch 128. Elsewhere CUDA graphs do not apply and only the eager rows are printed.

fedsync's loop carries the config's augmentation (random crop and flip, on the device); the bare loop has none,
so the headline ratio is the stricter one. A like-for-like ratio (augmentation off) is printed too.
Usage: python benchmarks/worker_throughput.py [--device cpu|cuda|mps] [--steps N] [--batch N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from fedsync.learning.capture import begin_step, capture
from fedsync.learning.data import Split
from fedsync.learning.device import DeviceFacts, choose_device, choose_precision, describe
from fedsync.learning.models import build_model
from fedsync.learning.tasks import get_task
from fedsync.learning.train import AUTOCAST, TrainSettings, local_train
from fedsync.run.config import load_config

REPEATS = 3


def bare_loop(data: Split, settings: TrainSettings, device: str, steps: int, graphs: bool = False) -> float:
    """The plainest correct loop: batches sliced from a device-resident tensor, autocast, optimizer step; with
    `graphs`, the model compiled with torch.compile(mode="reduce-overhead"): the CUDA-graph ceiling."""
    model = build_model("resnet18_cifar", 10).to(device).train()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, mode="reduce-overhead", dynamic=False) if graphs else model
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, fused=device.startswith("cuda") or None)
    kind = device.split(":")[0]
    scaler = torch.amp.GradScaler(kind, enabled=settings.precision == "fp16")
    x, y = data.x.to(device), data.y.to(device)
    bs, n = settings.batch_size, len(y)

    def step(i: int) -> None:
        start = (i * bs) % (n - bs + 1)
        xb = x[start:start + bs].contiguous(memory_format=torch.channels_last if settings.channels_last
                                            else torch.preserve_format)
        if graphs:
            begin_step()
        with torch.autocast(kind, dtype=AUTOCAST.get(settings.precision), enabled=settings.precision in AUTOCAST):
            loss = F.cross_entropy(forward(xb), y[start:start + bs])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for i in range(3 if graphs else 1):  # warm-up (compile, record), as local_train's first call below is
        step(i)
    _sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return steps * bs / (time.perf_counter() - t)


def fedsync_loop(data: Split, settings: TrainSettings, device: str, steps: int, graphs: bool = False) -> float:
    """As the worker trains: one model for the process, captured once when `graphs` (warm-up: compile, record)."""
    model = build_model("resnet18_cifar", 10)
    captured = capture(model) if graphs else None
    local_train(model, data, replace(settings, steps=3), device, seed=0, captured=captured)  # warm-up
    return local_train(model, data, replace(settings, steps=steps), device, seed=1, captured=captured).samples_per_s


def timed(f: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    return f(), time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default: 6 CPU, 100 GPU)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: the cifar10 config's, 128)")
    args = ap.parse_args()
    facts = DeviceFacts.probe()
    device = choose_device(args.device, facts).device
    steps = args.steps or (6 if device == "cpu" else 100)
    cfg = load_config("cifar10")
    settings = TrainSettings(epochs=1, batch_size=args.batch or cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, augment=get_task(cfg.task).augment if cfg.augment else None,
                             precision=choose_precision(cfg.precision, device, facts),
                             channels_last=device.startswith("cuda"))
    n = settings.batch_size * (steps + 2)
    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    name, cap = describe(device, facts)
    print(f"device {device} ({name}{', sm ' + cap if cap else ''}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; resnet18_cifar, batch {settings.batch_size}, precision "
          f"{settings.precision}, {steps} timed steps, best of {REPEATS}")
    results: dict[str, list[float]] = {"bare": [], "fedsync": [], "fedsync_noaug": []}
    for _ in range(REPEATS):
        results["bare"].append(bare_loop(data, settings, device, steps))
        results["fedsync"].append(fedsync_loop(data, settings, device, steps))
        results["fedsync_noaug"].append(fedsync_loop(data, replace(settings, augment=None), device, steps))
    best = {k: max(v) for k, v in results.items()}
    print(f"  bare PyTorch loop:                 {best['bare']:9.1f} samples/s")
    print(f"  fedsync local_train (augment on):  {best['fedsync']:9.1f} samples/s -> "
          f"{best['fedsync'] / best['bare']:.2f}x (goal >= 0.9x)")
    print(f"  fedsync local_train (augment off): {best['fedsync_noaug']:9.1f} samples/s -> "
          f"{best['fedsync_noaug'] / best['bare']:.2f}x")
    if not device.startswith("cuda"):
        print("  CUDA graphs need a CUDA GPU: the ceiling and fedsync's captured loop are measured on one")
        return
    ceiling, ceiling_s = timed(lambda: bare_loop(data, settings, device, steps, graphs=True))
    ours, ours_s = timed(lambda: fedsync_loop(data, settings, device, steps, graphs=True))
    ours_noaug, _ = timed(lambda: fedsync_loop(data, replace(settings, augment=None), device, steps, graphs=True))
    print(f"  bare loop, CUDA graphs (ceiling):  {ceiling:9.1f} samples/s ({ceiling_s:.1f} s with compiling) -> "
          f"{ceiling / best['bare']:.2f}x eager")
    print(f"  fedsync captured (augment on):     {ours:9.1f} samples/s ({ours_s:.1f} s with compiling) -> "
          f"{ours / ceiling:.2f}x the ceiling (goal >= 0.8x)")
    print(f"  fedsync captured (augment off):    {ours_noaug:9.1f} samples/s -> "
          f"{ours_noaug / ceiling:.2f}x the ceiling")


if __name__ == "__main__":
    main()
