"""Which device a worker trains on, whether this torch build can drive it, and in which precision: decided
from facts gathered once, which tests inject (CI has no GPU).

A PyTorch wheel carries compiled kernels for a list of GPU architectures (`torch.cuda.get_arch_list()`).
A cubin `sm_XY` runs on GPUs of the same major version X with minor >= Y; PTX `compute_XY` is compiled by the
driver for any GPU of capability >= X.Y. A GPU outside both still makes `torch.cuda.is_available()` True and
then fails at its first kernel ("no kernel image is available for execution on the device"), so fedsync
checks before training, never in the middle of a round.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from fedsync.base.defaults import DEVICE_SPEC
from fedsync.base.errors import DeviceError

FACTS_ENV = "FEDSYNC_DEVICE_FACTS"  # tests only: JSON facts that replace what torch reports
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: each worker picks for its device (choose_precision)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class DeviceFacts:
    """What this machine and its torch build offer, gathered once; tests build these by hand."""

    torch: str
    cuda_build: str | None        # torch.version.cuda: None for a CPU-only (or MPS) build
    arch_list: tuple[str, ...]    # torch.cuda.get_arch_list(): the architectures the build has kernels for
    gpus: tuple[Gpu, ...]
    mps: bool
    triton: bool = False          # Triton importable: torch.compile can generate GPU kernels
    injected: bool = False        # True when FEDSYNC_DEVICE_FACTS replaced the real facts (no kernel is run)

    @staticmethod
    def probe() -> DeviceFacts:
        if os.environ.get(FACTS_ENV):
            return facts_from_json(os.environ[FACTS_ENV])
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps_backend = getattr(torch.backends, "mps", None)
        return DeviceFacts(
            torch=str(torch.__version__), cuda_build=torch.version.cuda,
            arch_list=tuple(torch.cuda.get_arch_list()),
            gpus=tuple(Gpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(n)),
            mps=bool(mps_backend and mps_backend.is_available()),
            triton=importlib.util.find_spec("triton") is not None,
        )


def facts_from_json(text: str) -> DeviceFacts:
    d = json.loads(text)
    return DeviceFacts(torch=d.get("torch", str(torch.__version__)), cuda_build=d.get("cuda_build"),
                       arch_list=tuple(d.get("arch_list", ())), mps=bool(d.get("mps", False)),
                       triton=bool(d.get("triton", False)), injected=True,
                       gpus=tuple(Gpu(i, g["name"], (int(g["capability"][0]), int(g["capability"][1])))
                                  for i, g in enumerate(d.get("gpus", ()))))


def has_kernels(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether a build with these architectures can run kernels on a GPU of this compute capability."""
    major, minor = capability
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not m:
            continue
        a_major, a_minor = int(m.group(2)), int(m.group(3))
        if m.group(1) == "sm" and a_major == major and a_minor <= minor:
            return True
        if m.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


@dataclass(frozen=True)
class InstallPath:
    """One way to install torch; requirements/<file>.txt holds the same lines (a test keeps them equal)."""

    file: str
    who: str
    index_url: str | None
    torch: str
    torchvision: str

    def command(self, python: str = "python") -> str:
        index = f" --index-url {self.index_url}" if self.index_url else ""
        return (f"{python} -m pip uninstall -y torch torchvision && {python} -m pip install "
                f"'torch{self.torch}' 'torchvision{self.torchvision}'{index}")


MODERN = InstallPath("requirements/modern.txt", "CPU, Apple MPS, and NVIDIA GPUs of compute capability 7.5 "
                     "(Turing) and newer", None, ">=2.14.1", ">=0.29.1")
LEGACY = InstallPath("requirements/legacy_sm61.txt", "NVIDIA GPUs of compute capability 5.0 to 7.0 (Maxwell, "
                     "Pascal such as the GTX 1080, Volta); the 2.14 CUDA 12.6 wheels are the last with their kernels",
                     "https://download.pytorch.org/whl/cu126", ">=2.14,<2.15", ">=0.29,<0.30")


def install_path_for(capability: tuple[int, int]) -> InstallPath | None:
    """The wheels that carry kernels for this GPU, or None when no current PyTorch wheel does (before 5.0)."""
    if capability < (5, 0):
        return None
    return LEGACY if capability < (7, 5) else MODERN


def gpu_problem(gpu: Gpu, facts: DeviceFacts) -> str | None:
    """Why this torch build cannot drive the GPU; None when it can."""
    if has_kernels(gpu.capability, facts.arch_list):
        return None
    have = " ".join(facts.arch_list) or "none"
    return (f"GPU {gpu.index} ({gpu.name}, compute capability {gpu.sm}) cannot be driven by this torch "
            f"{facts.torch} (CUDA {facts.cuda_build or 'none'}): the build has kernels for {have} only, so its "
            "first kernel would fail with 'no kernel image is available for execution on the device'.")


def gpu_fix(gpu: Gpu) -> str:
    """The exact command that installs a torch able to drive this GPU, or what to do when none exists."""
    path = install_path_for(gpu.capability)
    if path is None:
        return "no current PyTorch wheel supports this GPU: train on the CPU (--device cpu)"
    return f"{path.command(sys.executable)}   (wheels for {path.who}; same as {path.file})"


def gpu_error(gpu: Gpu, facts: DeviceFacts) -> str | None:
    problem = gpu_problem(gpu, facts)
    return None if problem is None else f"{problem} Fix: {gpu_fix(gpu)}"


@dataclass(frozen=True)
class DeviceChoice:
    device: str                 # cpu | mps | cuda:N
    fallback: str | None = None  # why --device auto did not take a GPU that is present


def choose_device(spec: str, facts: DeviceFacts) -> DeviceChoice:
    """Resolve --device: auto picks the first GPU this build can drive, then MPS, then the CPU, saying why it
    passed over a GPU; an explicit device must exist and be drivable, or this fails at once."""
    if not DEVICE_SPEC.match(spec):
        raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    problems = {g.index: gpu_error(g, facts) for g in facts.gpus}
    if spec == "auto":
        usable = [i for i, p in problems.items() if p is None]
        if usable:
            return DeviceChoice(f"cuda:{usable[0]}")
        fallback = " ".join(p for p in problems.values() if p) or None
        return DeviceChoice("mps" if facts.mps else "cpu", fallback)
    if spec.startswith("cuda"):
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if not facts.gpus:
            raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU on this machine "
                              f"(torch {facts.torch}, CUDA build {facts.cuda_build or 'none'})")
        if index >= len(facts.gpus):
            raise DeviceError(f"--device {spec}: only {len(facts.gpus)} CUDA GPU(s) are present")
        if problems[index]:
            raise DeviceError(problems[index])
        return DeviceChoice(f"cuda:{index}")
    if spec == "mps" and not facts.mps:
        raise DeviceError("--device mps was asked for, but MPS is not available (needs Apple silicon and a "
                          "torch build with MPS)")
    return DeviceChoice(spec)


def gpu_of(device: str, facts: DeviceFacts) -> Gpu | None:
    return facts.gpus[int(device.split(":")[1])] if device.startswith("cuda") else None


def describe(device: str, facts: DeviceFacts) -> tuple[str, str | None]:
    """A human name for the device and, for CUDA, its compute capability as 'major.minor'."""
    gpu = gpu_of(device, facts)
    if gpu is not None:
        return gpu.name, gpu.sm
    return ("Apple MPS", None) if device == "mps" else ("CPU", None)


def choose_precision(setting: str, device: str, facts: DeviceFacts, weights_bound: bool = False) -> str:
    """auto: bf16 autocast on capability 8.0 and newer, fp16 with a gradient scaler on 7.x, fp32 on older GPUs
    (Pascal's fp16 runs at a fraction of its fp32 speed), the CPU and MPS. A model whose frozen weights bound its
    memory (`weights_bound`: a language model's base, held in the precision it trains in) takes fp16 on 6.x too:
    half the memory decides whether it fits an 8 GB card at all. An explicit setting the device cannot honour
    fails at once."""
    if setting not in PRECISIONS:
        raise DeviceError(f"precision {setting!r} is not one of {', '.join(PRECISIONS)}")
    gpu = gpu_of(device, facts)
    if setting == "auto":
        if gpu is None or gpu.capability < ((6, 0) if weights_bound else (7, 0)):
            return "fp32"
        return "bf16" if gpu.capability >= (8, 0) else "fp16"
    if gpu is not None and setting == "bf16" and gpu.capability < (8, 0):
        raise DeviceError(f"precision bf16 needs compute capability 8.0 or newer; {gpu.name} is {gpu.sm}: "
                          "use precision auto, fp16 or fp32")
    return setting
