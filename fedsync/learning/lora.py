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
from fedsync.storage.hashing import Hasher

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NEEDS_LLM = "the causal_lm task needs transformers and peft: pip install 'fedsync[llm]'"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's defaults for the architecture (Llama, Qwen: q_proj and
                                             # v_proj; GPT-2: c_attn)
    gradient_checkpointing: bool = False     # recompute the base's activations in the backward pass: less memory for
                                             # longer texts or larger batches, about a third more compute


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

    def __init__(self, folder: Path, lora: LoraSettings, seed: int = 0) -> None:
        super().__init__()
        try:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise ConfigError(NEEDS_LLM) from None
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
        base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        if lora.gradient_checkpointing:  # non-reentrant: the frozen base's inputs need no gradient of their own
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
