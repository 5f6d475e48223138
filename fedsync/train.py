"""Local training and evaluation on tensors held in memory (both datasets fit), read top to bottom."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: bool


@dataclass(frozen=True)
class TrainResult:
    samples: int       # distinct examples in the shard: FedAvg's weight
    steps: int
    train_loss: float  # mean loss over every example seen


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after 4-pixel zero padding, and random horizontal flip, vectorised on x's device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


def local_train(model: nn.Module, data: Split, settings: TrainSettings, device: str, seed: int) -> TrainResult:
    """SGD over the shard for `settings.epochs` passes, starting from the model's current weights."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    x, y = data.x.to(device), data.y.to(device)
    n = len(y)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    steps = 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb, yb = x[idx], y[idx]
            if settings.augment:
                xb = augment_batch(xb, generator)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            steps += 1
    return TrainResult(samples=n, steps=steps, train_loss=float(loss_sum) / (n * settings.epochs))


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int, device: str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the split."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = data.x[start:start + batch_size].to(device)
        yb = data.y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(data), correct / len(data)
