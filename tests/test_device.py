"""Device choice, the Pascal diagnosis, precision and `fedsync doctor`, decided from injected facts (CI has no GPU),
plus the real checks that do run here: the CPU kernel check and a CUDA device that is not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fedsync.base.errors import DeviceError
from fedsync.learning.device import (
    LEGACY,
    MODERN,
    DeviceChoice,
    DeviceFacts,
    Gpu,
    choose_device,
    choose_precision,
    describe,
    has_kernels,
    install_path_for,
)
from fedsync.learning.doctor import KernelRun, examine, kernel_check, start_check

from .helpers import run

CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # torch 2.14.1+cu130, read off this machine
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")  # PyTorch's 12.6 build matrix
GTX1080 = Gpu(0, "NVIDIA GeForce GTX 1080", (6, 1))
RTX4090 = Gpu(1, "NVIDIA GeForce RTX 4090", (8, 9))


def facts(arch: tuple[str, ...], *gpus: Gpu, mps: bool = False) -> DeviceFacts:
    return DeviceFacts(torch="2.14.1", cuda_build="13.0" if arch == CU130 else "12.6", arch_list=arch,
                       gpus=tuple(Gpu(i, g.name, g.capability) for i, g in enumerate(gpus)), mps=mps, injected=True)


def as_env(f: DeviceFacts) -> dict[str, str]:
    return {"FEDSYNC_DEVICE_FACTS": json.dumps({"cuda_build": f.cuda_build, "arch_list": list(f.arch_list),
                                                "gpus": [{"name": g.name, "capability": list(g.capability)}
                                                         for g in f.gpus]})}


@pytest.mark.parametrize("capability, arch, expected", [
    ((6, 1), CU130, False),   # the GTX 1080 on today's wheels
    ((6, 1), CU126, True),    # sm_60 cubins run on 6.1 (same major, lower minor)
    ((7, 0), CU130, False),   # Volta left the CUDA 12.8+ builds too
    ((8, 9), CU126, True),    # sm_86 cubins run on 8.9
    ((12, 0), CU126, False),  # a Blackwell card on the legacy build
    ((12, 0), CU130, True),
    ((10, 3), ("sm_90", "compute_90"), True),   # PTX is compiled by the driver for newer GPUs
    ((8, 0), ("compute_90",), False),           # ... never for older ones
    ((9, 0), ("sm_90a",), True),
    ((6, 1), (), False),
])
def test_which_builds_carry_kernels_for_which_gpus(capability: tuple[int, int], arch: tuple[str, ...],
                                                   expected: bool) -> None:
    assert has_kernels(capability, arch) is expected


def test_install_path_per_generation() -> None:
    assert install_path_for((6, 1)) is LEGACY and install_path_for((7, 0)) is LEGACY
    assert install_path_for((5, 2)) is LEGACY and install_path_for((7, 5)) is MODERN
    assert install_path_for((12, 0)) is MODERN and install_path_for((3, 5)) is None


def test_requirements_files_say_what_the_doctor_prints() -> None:
    root = Path(__file__).parent.parent
    for path in (LEGACY, MODERN):
        lines = [x.strip() for x in (root / path.file).read_text().splitlines()]
        assert lines[0].startswith("# For:"), "each file says who it is for"
        reqs = {r.name: r for r in (Requirement(x) for x in lines if x and not x.startswith(("#", "--")))}
        assert set(reqs) == {"torch", "torchvision"}
        assert str(reqs["torch"].specifier) == str(Requirement("torch" + path.torch).specifier)
        assert str(reqs["torchvision"].specifier) == str(Requirement("torchvision" + path.torchvision).specifier)
        index = [x.split()[1] for x in lines if x.startswith("--index-url")]
        assert index == ([path.index_url] if path.index_url else [])
        assert (path.index_url or "") in path.command() and path.torch in path.command()
    legacy = Requirement("torch" + LEGACY.torch).specifier
    assert "2.14.1" in legacy and "2.14.0" in legacy and "2.15.0" not in legacy and "2.13.1" not in legacy
    assert LEGACY.index_url and LEGACY.index_url.endswith("/cu126")


def test_auto_takes_the_first_gpu_the_build_can_drive() -> None:
    assert choose_device("auto", facts(CU130, GTX1080, RTX4090)) == DeviceChoice("cuda:1")
    assert choose_device("auto", facts(CU126, GTX1080, RTX4090)) == DeviceChoice("cuda:0")
    assert choose_device("auto", facts((), mps=True)) == DeviceChoice("mps")
    assert choose_device("auto", facts(())) == DeviceChoice("cpu")
    assert describe("cuda:1", facts(CU130, GTX1080, RTX4090)) == ("NVIDIA GeForce RTX 4090", "8.9")


def test_auto_on_a_pascal_card_falls_back_to_the_cpu_and_says_why() -> None:
    choice = choose_device("auto", facts(CU130, GTX1080))
    assert choice.device == "cpu" and choice.fallback
    assert "GTX 1080" in choice.fallback and "6.1" in choice.fallback and "no kernel image" in choice.fallback
    assert "download.pytorch.org/whl/cu126" in choice.fallback and "torch>=2.14,<2.15" in choice.fallback


@pytest.mark.parametrize("spec, f, words", [
    ("cuda", facts(CU130, GTX1080), "cannot be driven.*cu126"),
    ("cuda:0", facts(CU130, GTX1080, RTX4090), "compute capability 6.1"),
    ("cuda", facts(()), "no CUDA GPU"), ("cuda:2", facts(CU130, RTX4090), "only 1"),
    ("mps", facts(()), "MPS is not available"), ("tpu", facts(()), "not one of")])
def test_explicit_devices_that_cannot_train_fail_at_once(spec: str, f: DeviceFacts, words: str) -> None:
    with pytest.raises(DeviceError, match=words):
        choose_device(spec, f)


def test_precision_follows_the_hardware_and_refuses_what_it_cannot_do() -> None:
    f = facts(CU126, GTX1080, Gpu(1, "Tesla T4", (7, 5)), Gpu(2, "NVIDIA H100", (9, 0)))
    assert [choose_precision("auto", d, f) for d in ("cuda:0", "cuda:1", "cuda:2", "cpu", "mps")] == \
        ["fp32", "fp16", "bf16", "fp32", "fp32"]
    assert choose_precision("fp32", "cuda:2", f) == "fp32" and choose_precision("bf16", "cpu", f) == "bf16"
    with pytest.raises(DeviceError, match="bf16 needs compute capability 8.0.*Tesla T4 is 7.5"):
        choose_precision("bf16", "cuda:1", f)
    with pytest.raises(DeviceError, match="not one of"):
        choose_precision("fp8", "cpu", f)


def test_the_doctor_reports_each_device_and_the_fix() -> None:
    ok = KernelRun(True, "3 ms", {"fp32": True, "bf16": True, "fp16": True})
    findings = examine(facts(CU130, GTX1080, RTX4090), {"cpu": ok, "cuda:1": None})
    problems = [f for f in findings if f.level == "problem"]
    assert len(problems) == 1 and "GTX 1080" in problems[0].text
    assert problems[0].fix and "--index-url https://download.pytorch.org/whl/cu126" in problems[0].fix
    assert any("RTX 4090" in f.text and "bf16" in f.text and f.level == "ok" for f in findings)
    assert any(f.level == "note" and "not run" in f.text for f in findings)
    broken = KernelRun(False, "RuntimeError: CUDA error: no kernel image is available", {})
    findings = examine(facts(CU126, GTX1080), {"cpu": ok, "cuda:0": broken})
    assert [f.text for f in findings if f.level == "problem"] == \
        ["cuda:0: a tiny training step failed: RuntimeError: CUDA error: no kernel image is available"]


def test_the_kernel_check_runs_for_real_on_the_cpu_and_on_gpu_0_as_the_build_allows() -> None:
    cpu = kernel_check("cpu")
    assert cpu.ok and cpu.dtypes["fp32"] and cpu.dtypes["bf16"]
    f = DeviceFacts.probe()
    drivable = bool(f.gpus) and has_kernels(f.gpus[0].capability, f.arch_list)
    cuda0 = kernel_check("cuda:0")  # no GPU here (CI), a GPU the build drives, or one it cannot
    assert cuda0.ok is drivable, cuda0
    if drivable:
        assert cuda0.dtypes["fp32"], cuda0
    else:
        assert cuda0.detail and cuda0.dtypes == {}, cuda0


def test_start_check_falls_back_or_fails_before_any_round() -> None:
    if DeviceFacts.probe().gpus:
        pytest.skip("this machine has a GPU: the failing-device case needs one without")
    # torch reports a GPU the build can drive, but the real kernel run fails (here: there is no GPU at all)
    ghost = DeviceFacts(torch="2.14.1", cuda_build="13.0", arch_list=CU130, gpus=(Gpu(0, "ghost", (8, 9)),),
                        mps=False)
    choice, precision = start_check("auto", DeviceChoice("cuda:0"), "auto", ghost)
    assert choice.device == "cpu" and precision == "fp32" and "cuda:0 in bf16 failed" in (choice.fallback or "")
    with pytest.raises(DeviceError, match="training step on cuda:0"):
        start_check("cuda", DeviceChoice("cuda:0"), "auto", ghost)
    assert start_check("cpu", DeviceChoice("cpu"), "bf16", ghost) == (DeviceChoice("cpu"), "bf16")


@pytest.mark.processes
def test_doctor_command(share: Path) -> None:
    real = run("doctor")
    assert "cpu: a tiny training step ran" in real.stdout and "torch" in real.stdout
    if not DeviceFacts.probe().gpus:
        assert real.returncode == 0, real.stdout + real.stderr
    pascal = run("doctor", env=as_env(facts(CU130, GTX1080)))
    assert pascal.returncode == 7, pascal.stdout + pascal.stderr
    assert "GTX 1080, compute capability 6.1) cannot be driven" in pascal.stdout
    assert "fix: " in pascal.stdout and "whl/cu126" in pascal.stdout


@pytest.mark.processes
def test_worker_with_device_cuda_on_pascal_fails_at_once(share: Path) -> None:
    out = run("worker", "--share", str(share), "--name", "w1", "--device", "cuda", "--wait-for-run", "5",
              env=as_env(facts(CU130, GTX1080)), timeout=30)
    assert out.returncode == 7, out.stdout + out.stderr
    assert "compute capability 6.1" in out.stderr and "whl/cu126" in out.stderr
    assert not (share / "workers").exists(), "nothing written to the share"
