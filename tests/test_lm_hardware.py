"""A language model on each machine's hardware: the precision a worker picks for a base whose weights bound its
memory (decided from injected facts: CI has no GPU), the base held in that precision or in 4 bits, and training
the adapters on such a base for real on the CPU: bf16, fp16 with a gradient scaler, and a 4-bit NF4 base through
bitsandbytes, whose CPU kernels stand in here for the CUDA ones a worker is allowed to use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsync.base.errors import ConfigError
from fedsync.learning.capture import plan_capture
from fedsync.learning.device import Gpu, choose_precision
from fedsync.learning.lora import AdaptedLM, BaseStorage, LoraSettings, base_storage, load_tokenizer
from fedsync.learning.text import encode, read_records
from fedsync.learning.train import TrainSettings, evaluate, local_train

from .lm_files import make_base, write_texts
from .test_capture import with_triton
from .test_device import CU126, GTX1080, RTX4090, facts

T4 = Gpu(2, "Tesla T4", (7, 5))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("lm") / "base")


def test_a_language_model_takes_half_precision_on_every_gpu_and_eager_steps() -> None:
    f = facts(CU126, GTX1080, RTX4090, T4)
    devices = ("cuda:0", "cuda:1", "cuda:2", "cpu", "mps")
    assert [choose_precision("auto", d, f, weights_bound=True) for d in devices] == \
        ["fp16", "bf16", "fp16", "fp32", "fp32"]  # Pascal: fp16 with a scaler, half the memory of fp32
    assert choose_precision("auto", "cuda:0", f) == "fp32"  # a small model keeps Pascal's fast fp32
    plan = plan_capture("auto", "cuda:1", with_triton(f), weights_bound=True)
    assert not plan.capture and "matrix products" in plan.why
    assert plan_capture("auto", "cuda:1", with_triton(f)).capture


def test_the_base_is_held_in_the_training_precision_or_4_bits_on_cuda_alone() -> None:
    assert base_storage("fp32", "cpu", None) == BaseStorage(torch.float32)
    assert base_storage("bf16", "cuda:0", None) == BaseStorage(torch.bfloat16)
    assert base_storage("fp16", "cuda:0", None) == BaseStorage(torch.float16)
    assert base_storage("bf16", "cuda:1", "4bit") == BaseStorage(torch.bfloat16, "cuda:1")
    for device in ("cpu", "mps"):
        with pytest.raises(ConfigError, match=f"needs a CUDA GPU.*trains on {device}"):
            base_storage("fp32", device, "4bit")
    with pytest.raises(ConfigError, match="not one of 4bit"):
        base_storage("bf16", "cuda:0", "3bit")


@pytest.mark.parametrize("storage,precision", [(BaseStorage(torch.bfloat16), "bf16"),
                                               (BaseStorage(torch.float16), "fp16"),
                                               (BaseStorage(torch.bfloat16, "cpu"), "bf16")],
                         ids=["bf16", "fp16-scaled", "4bit-nf4"])
def test_adapters_on_a_base_held_in_half_or_4_bits_train_and_are_the_same_adapters(
        base: Path, tmp_path: Path, storage: BaseStorage, precision: str) -> None:
    data = encode(read_records(write_texts(tmp_path / "t", "cooking")), load_tokenizer(base), 24, print)
    full = AdaptedLM(base, LoraSettings())
    held = AdaptedLM(base, LoraSettings(), storage=storage)
    frozen = {p.dtype for p in held.parameters() if not p.requires_grad}
    assert (torch.uint8 in frozen) == (storage.four_bit is not None)  # the 4-bit base's packed weights
    assert storage.four_bit is not None or frozen == {storage.dtype}
    state = full.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in held.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in state.items()}  # fp32 adapters of the same names: the same run
    held.load_state_dict(state)
    twin = AdaptedLM(base, LoraSettings(), storage=storage)  # measured on a twin: bitsandbytes' CPU kernels repack a
    twin.load_state_dict(state)                            # 4-bit base run without gradients, and it trains no more
    before = evaluate(twin, data, 16)[0]
    settings = TrainSettings(epochs=4, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.0, augment=None,
                             precision=precision)
    local_train(held, data, settings, "cpu", seed=1)
    after = evaluate(held, data, 16)[0]
    assert after < before - 0.1, (before, after)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in held.state_dict().values())
