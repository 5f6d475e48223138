"""Samples/s of the fedsync worker's local training (fedsync.learning.train.local_train, as the worker calls it) on
CIFAR-10-shaped data with the cifar10 config's model and batch size, beside a bare PyTorch loop of the same
model, batch size and precision on the same device, in the same run (alternating, best of REPEATS each).

fedsync's loop carries the config's augmentation (random crop and flip, on the device); the bare loop has none,
so the headline ratio is the stricter one. A like-for-like ratio (augmentation off) is printed too.
Usage: python benchmarks/worker_throughput.py [--device cpu|cuda|mps] [--steps N]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from fedsync.learning.data import Split
from fedsync.learning.device import DeviceFacts, choose_device, choose_precision, describe
from fedsync.learning.models import build_model
from fedsync.learning.tasks import get_task
from fedsync.learning.train import AUTOCAST, TrainSettings, local_train
from fedsync.run.config import load_config

REPEATS = 3


def bare_loop(data: Split, settings: TrainSettings, device: str, steps: int) -> float:
    """The plainest correct loop: batches sliced from a device-resident tensor, autocast, optimizer step."""
    model = build_model("resnet18_cifar", 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    kind = device.split(":")[0]
    scaler = torch.amp.GradScaler(kind, enabled=settings.precision == "fp16")
    x, y = data.x.to(device), data.y.to(device)
    bs, n = settings.batch_size, len(y)

    def step(i: int) -> None:
        start = (i * bs) % (n - bs + 1)
        with torch.autocast(kind, dtype=AUTOCAST.get(settings.precision), enabled=settings.precision in AUTOCAST):
            loss = F.cross_entropy(model(x[start:start + bs]), y[start:start + bs])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step(0)  # warm-up, as local_train's first call below is
    _sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return steps * bs / (time.perf_counter() - t)


def fedsync_loop(data: Split, settings: TrainSettings, device: str, steps: int) -> float:
    model = build_model("resnet18_cifar", 10)
    local_train(model, data, replace(settings, steps=1), device, seed=0)  # warm-up
    return local_train(model, data, replace(settings, steps=steps), device, seed=1).samples_per_s


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default: 6 CPU, 100 GPU)")
    args = ap.parse_args()
    facts = DeviceFacts.probe()
    device = choose_device(args.device, facts).device
    steps = args.steps or (6 if device == "cpu" else 100)
    cfg = load_config("cifar10")
    settings = TrainSettings(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, augment=get_task(cfg.task).augment if cfg.augment else None,
                             precision=choose_precision(cfg.precision, device, facts),
                             channels_last=device.startswith("cuda"))
    n = cfg.batch_size * (steps + 2)
    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    name, cap = describe(device, facts)
    print(f"device {device} ({name}{', sm ' + cap if cap else ''}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; resnet18_cifar, batch {cfg.batch_size}, precision "
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


if __name__ == "__main__":
    main()
