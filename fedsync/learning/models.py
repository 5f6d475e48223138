"""The model registry: a config names its model, and every process builds the same architecture from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

ModelFactory = Callable[[int], nn.Module]
REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def wrap(factory: ModelFactory) -> ModelFactory:
        REGISTRY[name] = factory
        return factory

    return wrap


def build_model(name: str, num_classes: int, seed: int | None = None,
                registry: Mapping[str, ModelFactory] = REGISTRY) -> nn.Module:
    """A fresh model from `registry` (fedsync's own, or a task's); with a seed, the same initial weights on every
    machine."""
    if name not in registry:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(registry))}")
    if seed is not None:
        torch.manual_seed(seed)
    return registry[name](num_classes)


def small_cnn(channels: int, num_classes: int, norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
              adaptive: bool = False) -> nn.Sequential:
    """Two 3x3 convolutions (32 and 64 maps) with a norm layer after each, a 2x2 max-pool, then 1024 -> 128 -> classes;
    `adaptive` brings the map to 4x4 first, so any image size fits (at 8x8 it changes nothing)."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), norm(64), nn.ReLU(),
        nn.MaxPool2d(2),
        *([nn.AdaptiveAvgPool2d(4)] if adaptive else []),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@register("digits_cnn")
def digits_cnn(num_classes: int) -> nn.Module:
    """A small CNN for 1x8x8 digits (about 0.15 M parameters), with BatchNorm to exercise buffer averaging."""
    return small_cnn(1, num_classes)


@register("digits_cnn_gn")
def digits_cnn_gn(num_classes: int) -> nn.Module:
    """digits_cnn with GroupNorm (8 groups) for BatchNorm: no statistics of the data in buffers, so differential
    privacy covers the whole model (Opacus's documented replacement)."""
    return small_cnn(1, num_classes, lambda maps: nn.GroupNorm(8, maps))


@register("digits_linear")
def digits_linear(num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the 64 pixels (650 parameters): the size at which user-level differential
    privacy over tens of workers still learns (README, "Privacy")."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


@register("digits_mlp")
def digits_mlp(num_classes: int) -> nn.Module:
    """A wide MLP for 1x8x8 digits (1.13 M parameters, a 4.5 MB update): the same task at the size where a
    coordinator's per-update costs show (benchmarks/scale_workers.py)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, num_classes))


@register("resnet18_cifar")
def resnet18_cifar(num_classes: int, channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool, as usual for CIFAR (11.2 M params)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def image_cnn(channels: int, num_classes: int) -> nn.Module:
    """digits_cnn for any image size and channel count."""
    return small_cnn(channels, num_classes, adaptive=True)


def image_models(channels: int) -> dict[str, ModelFactory]:
    """The imagefolder task's models for images of `channels` channels."""
    return {"image_cnn": partial(image_cnn, channels),
            "resnet18": lambda num_classes: resnet18_cifar(num_classes, channels)}


def data_buffers(model: nn.Module) -> list[str]:
    """The model's buffers that training fills from the data and that travel in its state (BatchNorm's running
    statistics): differential privacy would have to noise them too, and neither DP-FedAvg's clipping nor Opacus
    bounds them. (A language model's rotary frequencies are buffers too, but fixed and not in its state.)"""
    state = model.state_dict()
    return sorted(name for name, b in model.named_buffers() if b.is_floating_point() and name in state)


def constrained_buffers(model: nn.Module) -> dict[str, str]:
    """The buffers whose values honest training keeps within bounds (fedsync/aggregation/validity.py): each
    BatchNorm-style layer's running variance ("variance", never negative) and batch counter ("count")."""
    out: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            dot = f"{prefix}." if prefix else ""
            out[f"{dot}running_var"] = "variance"
            out[f"{dot}num_batches_tracked"] = "count"
    return out
