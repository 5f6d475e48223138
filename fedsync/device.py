"""Which torch device a worker trains on, decided from facts that tests can inject."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import DeviceError

DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DeviceFacts:
    """What this machine offers, gathered once; tests build these by hand."""

    cuda_devices: tuple[str, ...]  # names, index = CUDA ordinal
    cuda_capabilities: tuple[tuple[int, int], ...]
    mps: bool

    @staticmethod
    def probe() -> DeviceFacts:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps_backend = getattr(torch.backends, "mps", None)
        return DeviceFacts(
            cuda_devices=tuple(torch.cuda.get_device_name(i) for i in range(n)),
            cuda_capabilities=tuple(torch.cuda.get_device_capability(i) for i in range(n)),
            mps=bool(mps_backend and mps_backend.is_available()),
        )


def choose_device(spec: str, facts: DeviceFacts) -> str:
    """Resolve --device: auto picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if not DEVICE_SPEC.match(spec):
        raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if spec == "auto":
        if facts.cuda_devices:
            return "cuda:0"
        return "mps" if facts.mps else "cpu"
    if spec.startswith("cuda"):
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if not facts.cuda_devices:
            raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        if index >= len(facts.cuda_devices):
            raise DeviceError(f"--device {spec}: only {len(facts.cuda_devices)} CUDA GPU(s) are present")
        return f"cuda:{index}"
    if spec == "mps" and not facts.mps:
        raise DeviceError("--device mps was asked for, but MPS is not available (needs Apple silicon and a "
                          "torch build with MPS)")
    return spec


def describe(device: str, facts: DeviceFacts) -> tuple[str, str | None]:
    """A human name for the device and, for CUDA, its compute capability as 'major.minor'."""
    if device.startswith("cuda"):
        i = int(device.split(":")[1])
        major, minor = facts.cuda_capabilities[i]
        return facts.cuda_devices[i], f"{major}.{minor}"
    if device == "mps":
        return "Apple MPS", None
    return "CPU", None
