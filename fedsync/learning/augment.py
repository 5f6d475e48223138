"""Augmentations a task applies to each training batch, on the batch's device with the device's own generator
(so no random number crosses from the host). A config names them: `augment: true` is the task's own choice, or one
of NAMED."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding of an eighth of the height on every side (4 pixels at 32x32), vectorised on
    x's device (`generator` must live on that device too)."""
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left to right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5)[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


def crop_and_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return random_flip(random_crop(x, generator), generator)


NAMED = {"crop": random_crop, "flip": random_flip, "crop+flip": crop_and_flip}
