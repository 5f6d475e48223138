"""The captured training step: where a worker captures it (decided from injected facts: CI has no GPU), and the
loop that sends full batches to the captured model and an epoch's last partial batch to the eager one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsync.learning.capture import plan_capture
from fedsync.learning.data import Split
from fedsync.learning.device import DeviceFacts, Gpu
from fedsync.learning.models import build_model
from fedsync.learning.train import TrainSettings, local_train

from .test_device import CU126, CU130, GTX1080, RTX4090, facts

H100 = Gpu(0, "NVIDIA H100", (9, 0))


def with_triton(f: DeviceFacts) -> DeviceFacts:
    return DeviceFacts(torch=f.torch, cuda_build=f.cuda_build, arch_list=f.arch_list, gpus=f.gpus, mps=f.mps,
                       triton=True, injected=True)


def test_capture_only_where_cuda_graphs_and_triton_exist() -> None:
    assert plan_capture("auto", "cuda:0", with_triton(facts(CU130, H100))).capture
    assert plan_capture("auto", "cuda:1", with_triton(facts(CU130, GTX1080, RTX4090))).capture
    eager = {
        "on cpu": plan_capture("auto", "cpu", with_triton(facts(CU130, H100))),
        "on mps": plan_capture("auto", "mps", facts((), mps=True)),
        "Pascal": plan_capture("auto", "cuda:0", with_triton(facts(CU126, GTX1080))),
        "no triton": plan_capture("auto", "cuda:0", facts(CU130, H100)),
        "off": plan_capture("off", "cuda:0", with_triton(facts(CU130, H100))),
    }
    assert not any(p.capture for p in eager.values())
    assert "need a CUDA GPU" in eager["on cpu"].why and "trains on cpu" in eager["on cpu"].why
    assert "trains on mps" in eager["on mps"].why
    assert "7.0 and newer" in eager["Pascal"].why and "GTX 1080 is 6.1" in eager["Pascal"].why
    assert "Triton is not installed" in eager["no triton"].why
    assert "--capture off" in eager["off"].why
    with pytest.raises(ValueError, match="not one of auto, off"):
        plan_capture("always", "cuda:0", facts(CU130, H100))


class Counting(nn.Module):
    """Stands where the compiled model would: the same weights, and a count of the batches it ran."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(len(x))
        return self.model(x)


def test_full_batches_go_to_the_captured_step_and_the_last_partial_one_runs_eagerly() -> None:
    gen = torch.Generator().manual_seed(3)
    data = Split(torch.randn(100, 1, 8, 8, generator=gen), torch.randint(0, 10, (100,), generator=gen))
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4, augment=None)
    eager, wrapped = build_model("digits_cnn", 10, seed=1), build_model("digits_cnn", 10, seed=1)
    counting = Counting(wrapped)
    plain = local_train(eager, data, settings, "cpu", seed=7)
    captured = local_train(wrapped, data, settings, "cpu", seed=7, captured=counting)
    assert counting.shapes == [32, 32, 32] * 2  # 100 = 3 x 32 + 4: the 4 ran on the eager model, once per epoch
    assert captured.samples == plain.samples == 100 and captured.processed == plain.processed == 200
    assert captured.train_loss == plain.train_loss
    for (name, a), b in zip(eager.state_dict().items(), wrapped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same step either way: the captured one only launches differently
