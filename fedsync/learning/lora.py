"""A Hugging Face causal language model that every machine already holds (a folder of its own: config, weights,
tokenizer), with LoRA adapters (Hu et al. 2021) through PEFT. Only the adapters train and only they are the
module's state: the global model and every update are the adapter tensors alone, a few MB where the base is GBs.

Every machine builds the same initial adapters from the run's seed. The base is named by the BLAKE3 of its weight
files, so a machine whose base differs can be refused before it trains (fedsync/run/start.py)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsync.base.errors import ConfigError
from fedsync.learning.train import AUTOCAST
from fedsync.storage.hashing import Hasher

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NEEDS_LLM = "the causal_lm task needs transformers and peft: pip install 'fedsync[llm]'"
QUANTIZE = ("4bit",)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's defaults for the architecture (Llama, Qwen: q_proj and
                                             # v_proj; GPT-2: c_attn)
    gradient_checkpointing: bool = False     # recompute the base's activations in the backward pass: less memory for
                                             # longer texts or larger batches, about a third more compute


@dataclass(frozen=True)
class BaseStorage:
    """How this machine holds the frozen base. Never part of what the run is: the adapters, their names and shapes
    are the same whichever way a machine holds it."""

    dtype: torch.dtype = torch.float32  # its weights' dtype (the 4-bit base's compute dtype)
    four_bit: str | None = None         # the device a 4-bit NF4 base (QLoRA, bitsandbytes) is loaded onto


def base_storage(precision: str, device: str, quantize: str | None) -> BaseStorage:
    """In the precision the machine trains in: autocast computes the base's matrix products in bf16 or fp16 anyway,
    and stored so it takes half the memory, which decides whether a model fits an 8 GB card. `quantize` 4bit holds
    it in 4 bits (Dettmers et al. 2023), a quarter of that, where bitsandbytes' kernels are built for the device: a
    CUDA GPU; refused elsewhere with the reason, before anything is written."""
    dtype = AUTOCAST.get(precision, torch.float32)
    if quantize is None:
        return BaseStorage(dtype)
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
    if not device.startswith("cuda"):
        raise ConfigError(f"--quantize 4bit needs a CUDA GPU: bitsandbytes' 4-bit kernels are built for CUDA, and "
                          f"this worker trains on {device}; leave --quantize out (the base is then held in "
                          f"{precision})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--quantize 4bit needs bitsandbytes: pip install 'fedsync[qlora]'") from None
    return BaseStorage(dtype, device)


def base_hash(folder: Path) -> str:
    """The BLAKE3 over the base's weight files: each file's name and the BLAKE3 of its bytes, in name order."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{folder} holds no model weights (*.safetensors): give each machine's copy of the base "
                          "model's folder")
    outer = Hasher()
    for path in files:
        inner = Hasher()
        with path.open("rb") as f:
            while piece := f.read(1 << 24):
                inner.update(piece)
        outer.update(f"{path.name} {inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def load_tokenizer(folder: Path) -> Any:
    """The base model's own tokenizer, from its folder."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(NEEDS_LLM) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


class AdaptedLM(nn.Module):
    """The base model with LoRA adapters; its forward gives the logits as (batch, vocabulary, positions) for
    cross-entropy against next-token labels, and its state is the adapters' tensors."""

    def __init__(self, folder: Path, lora: LoraSettings, seed: int = 0, storage: BaseStorage = BaseStorage()) -> None:
        super().__init__()
        try:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        except ImportError:
            raise ConfigError(NEEDS_LLM) from None
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
        checkpointing = {"use_reentrant": False}  # the frozen base's inputs need no gradient of their own
        if storage.four_bit is None:
            base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=storage.dtype)
            if lora.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        else:
            quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=storage.dtype)
            base = prepare_model_for_kbit_training(
                AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=storage.dtype,
                                                     quantization_config=quantized,
                                                     device_map={"": storage.four_bit}),
                use_gradient_checkpointing=lora.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing)
        torch.manual_seed(seed)  # the same initial adapters on every machine
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question about checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            self.peft = get_peft_model(base, config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.peft(input_ids=ids).logits.transpose(1, 2)

    def save_adapter(self, folder: Path) -> None:
        """The adapters in PEFT's own layout (adapter_model.safetensors, adapter_config.json), which
        `PeftModel.from_pretrained(base, folder)` loads onto the same base model."""
        self.peft.save_pretrained(folder)

    def trained(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: p.detach() for name, p in self.trained().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> Any:
        own = self.trained()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"not this model's adapters: missing {missing[:3]}, extra {extra[:3]}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name])
        return None
