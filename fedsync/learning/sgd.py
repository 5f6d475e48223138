"""SGD with momentum and weight decay, the same update as torch.optim.SGD (dampening 0, not Nesterov), in a few
foreach calls. Why not torch.optim: constructing any torch optimizer imports torch._dynamo, about 3 s of CPU per
process, which a CPU or MPS worker pays for nothing (on two cores, three demo workers lose ~4.5 s to it before
round 1). CUDA workers keep torch.optim's fused SGD, one kernel per step."""

from __future__ import annotations

import torch


class ForeachSGD:
    """p <- p - lr * b, with b <- momentum * b + (g + weight_decay * p) (b = that gradient on the first step)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            if self.buffers is None:
                self.buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads)
            grads = self.buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)
