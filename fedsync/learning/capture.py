"""Whether a worker captures its training step in CUDA graphs, and the capture itself.

At batch 128 a ResNet-18 step on a modern GPU is bound by Python launching its few hundred kernels one by one
(about 0.3 of what the GPU does). `torch.compile(mode="reduce-overhead")` records forward and backward as CUDA
graphs and replays each with one launch. It compiles for one input shape, so fedsync calls the captured model only
for full batches; an epoch's last partial batch runs eagerly on the same weights (every example still counts once
per epoch, and a second shape would cost a second compilation and a second graph's memory). The worker keeps one
model for its whole life and loads each round's weights into it in place, so compilation is paid once per
process, while it waits for its first round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsync.learning.device import DeviceFacts, gpu_of

CAPTURE_SETTINGS = ("auto", "off")
TRITON_MIN_CAPABILITY = (7, 0)  # Triton, torch.compile's GPU code generator, has no kernels for older GPUs


@dataclass(frozen=True)
class CapturePlan:
    capture: bool
    why: str  # said at start either way: what the worker does and, when eager, why


def plan_capture(setting: str, device: str, facts: DeviceFacts, weights_bound: bool = False) -> CapturePlan:
    """auto: CUDA graphs on a CUDA GPU of capability 7.0 or newer with Triton installed; eager elsewhere, saying
    why, and for a model whose weights bound it (a language model: its step is large matrix products, not many
    small kernel launches, so graphs save little and compiling it takes minutes). off: eager."""
    if setting not in CAPTURE_SETTINGS:
        raise ValueError(f"--capture {setting!r} is not one of {', '.join(CAPTURE_SETTINGS)}")
    if setting == "off":
        return CapturePlan(False, "eager training step (--capture off)")
    if weights_bound:
        return CapturePlan(False, "eager training step: a language model's step is bound by its matrix products, "
                                  "not by kernel launches, so CUDA graphs would save little")
    gpu = gpu_of(device, facts)
    if gpu is None:
        return CapturePlan(False, f"eager training step: CUDA graphs need a CUDA GPU, and this worker trains on "
                                  f"{device}")
    if gpu.capability < TRITON_MIN_CAPABILITY:
        return CapturePlan(False, f"eager training step: capturing it needs Triton, which supports compute "
                                  f"capability {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} and newer; "
                                  f"{gpu.name} is {gpu.sm}")
    if not facts.triton:
        return CapturePlan(False, "eager training step: Triton is not installed with this torch build, and "
                                  "torch.compile needs it to capture the step (pip install triton)")
    return CapturePlan(True, "training step captured in CUDA graphs (torch.compile, mode reduce-overhead)")


def capture(model: nn.Module) -> nn.Module:
    """The model compiled for one static batch shape, its forward and backward replayed as CUDA graphs. It shares
    `model`'s parameters and buffers: weights loaded into `model` in place are the ones the graphs use."""
    return torch.compile(model, mode="reduce-overhead", dynamic=False)


def begin_step() -> None:
    """Tell the graphs a new training step starts: the previous step's outputs may be overwritten."""
    torch.compiler.cudagraph_mark_step_begin()
