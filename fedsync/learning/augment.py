"""Augmentations a task applies to each training batch, on the batch's device with the device's own generator
(so no random number crosses from the host)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_and_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after 4-pixel zero padding, and random horizontal flip, vectorised on x's device
    (`generator` must live on that device too, so no random number crosses from the host)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 9, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = (torch.rand(b, generator=generator, device=x.device) < 0.5)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)
