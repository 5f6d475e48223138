"""`fedsync doctor`: what this machine can train on, checked for real, and the exact fix when it cannot.

`examine` is pure (facts and kernel results in, findings out) so its decisions are tested with injected
capabilities and arch lists; `kernel_check` runs a tiny real training step on a device, which is also what a
worker does at start so that nothing found here can fail it in the middle of a round.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsync.base.errors import DeviceError
from fedsync.learning.device import MODERN, DeviceChoice, DeviceFacts, choose_precision, gpu_fix, gpu_problem
from fedsync.learning.train import AUTOCAST


@dataclass(frozen=True)
class KernelRun:
    ok: bool
    detail: str                       # what failed, or the timing of the check
    dtypes: Mapping[str, bool]        # precision -> whether a step in it ran and gave finite numbers


@dataclass(frozen=True)
class Finding:
    level: str              # ok | note | problem
    text: str
    fix: str | None = None  # the exact command (or step) that resolves a problem


def kernel_check(device: str, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")) -> KernelRun:
    """One forward and backward pass of a small conv net on `device` in each precision (`ok` follows the first);
    the fp32 result is compared with the CPU's so that a device that runs but computes garbage is caught too."""
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 3, 16, 16, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    expected = F.conv2d(x, w).relu().sum()
    dtypes: dict[str, bool] = {}
    try:
        xd, wd = x.to(device), w.to(device).requires_grad_()
        for p in precisions:
            with torch.autocast(device.split(":")[0], dtype=AUTOCAST.get(p), enabled=p in AUTOCAST):
                out = F.conv2d(xd, wd).relu().sum()
            out.backward()
            value = float(out.detach())  # waits for the device: an asynchronous kernel failure surfaces here
            good = bool(torch.isfinite(wd.grad).all())
            if p == "fp32":
                good = good and abs(value - float(expected)) <= 1e-3 * max(1.0, abs(float(expected)))
            dtypes[p] = good
            wd.grad = None
    except Exception as e:  # noqa: BLE001 - any failure of the device is the finding
        return KernelRun(False, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", dtypes)
    took = f"{(time.perf_counter() - started) * 1000:.0f} ms"
    if not dtypes[precisions[0]]:
        return KernelRun(False, f"it ran ({took}) but gave a wrong or non-finite result in {precisions[0]}", dtypes)
    return KernelRun(True, took, dtypes)


def examine(facts: DeviceFacts, kernels: Mapping[str, KernelRun | None]) -> list[Finding]:
    """Findings for each device; `kernels[device]` is None where no kernel was run (injected facts)."""
    out = [Finding("ok", f"Python {platform.python_version()} ({sys.executable}); torch {facts.torch}, "
                         f"CUDA build {facts.cuda_build or 'none (CPU-only build)'}; kernels for "
                         f"{' '.join(facts.arch_list) or 'no GPU architecture'}")]

    def ran(device: str, label: str) -> None:
        k = kernels.get(device)
        if k is None:
            out.append(Finding("note", f"{label}: kernel check not run (device facts injected by a test)"))
        elif not k.ok:
            out.append(Finding("problem", f"{label}: a tiny training step failed: {k.detail}"))
        else:
            works = ", ".join(p for p, good in k.dtypes.items() if good)
            out.append(Finding("ok", f"{label}: a tiny training step ran ({k.detail}); works in {works}"))

    ran("cpu", "cpu")
    for gpu in facts.gpus:
        device = f"cuda:{gpu.index}"
        problem = gpu_problem(gpu, facts)
        if problem:
            out.append(Finding("problem", problem, gpu_fix(gpu)))
            continue
        label = f"{device} {gpu.name} (compute capability {gpu.sm})"
        out.append(Finding("ok", f"{label}: this build has kernels for it; precision auto uses "
                                 f"{choose_precision('auto', device, facts)}"))
        ran(device, device)
    if not facts.gpus and facts.cuda_build is None and sys.platform.startswith(("linux", "win")):
        out.append(Finding("note", "this torch is a CPU-only build: if this machine has an NVIDIA GPU, install a "
                                   "CUDA build", MODERN.command(sys.executable)))
    if facts.mps:
        ran("mps", "mps (Apple GPU)")
    elif sys.platform == "darwin":
        out.append(Finding("note", "MPS is not available: it needs Apple silicon, macOS 12.3+ and an arm64 Python"))
    return out


def run_checks(facts: DeviceFacts) -> dict[str, KernelRun | None]:
    """The real kernel check on every device the facts name (none when the facts were injected)."""
    devices = ["cpu"] + [f"cuda:{g.index}" for g in facts.gpus if gpu_problem(g, facts) is None]
    devices += ["mps"] if facts.mps else []
    return {d: (None if facts.injected and d != "cpu" else kernel_check(d)) for d in devices}


def report(facts: DeviceFacts) -> tuple[str, int]:
    """The doctor's text and exit status (0 when every device present can be trained on, else DeviceError's)."""
    findings = examine(facts, run_checks(facts))
    lines = [f"{f.level:>7}: {f.text}" + (f"\n    fix: {f.fix}" if f.fix else "") for f in findings]
    bad = [f for f in findings if f.level == "problem"]
    lines.append(f"{len(bad)} problem(s)" if bad else "every device present can train")
    return "\n".join(lines), DeviceError.exit_code if bad else 0


def start_check(spec: str, choice: DeviceChoice, precision: str, facts: DeviceFacts,
                weights_bound: bool = False) -> tuple[DeviceChoice, str]:
    """What a worker does before it registers: resolve the precision (fedsync/learning/device.py says how) and run
    one real training step on the chosen device in it. An explicit --device that fails is an error now; auto falls
    back to the CPU and says why. (With injected facts only the CPU is really checked.)"""
    resolved = choose_precision(precision, choice.device, facts, weights_bound)
    if facts.injected and choice.device != "cpu":
        return choice, resolved
    run = kernel_check(choice.device, (resolved,))
    if run.ok:
        return choice, resolved
    problem = f"a training step on {choice.device} in {resolved} failed: {run.detail}"
    if spec != "auto" or choice.device == "cpu":
        raise DeviceError(problem + "; run `fedsync doctor` for the full diagnosis")
    return DeviceChoice("cpu", problem), choose_precision(precision, "cpu", facts, weights_bound)
