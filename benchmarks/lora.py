"""Federated LoRA's two figures, each beside its baseline measured in the same run:

1. Bytes a round moves: the adapter (what a worker sends, what the coordinator publishes) against the full model,
   for the tiny Llama-style model the tests build (goal <= 0.02x at rank 8) and for Qwen2.5-0.5B's shapes (its
   published config; random weights on the meta device, nothing downloaded).
2. Tokens per second of a worker's training (fedsync's own loop over the causal_lm task's data and model) against
   a bare PEFT training loop on the same base, data, batch and optimizer (goal >= 0.9x).

Usage: python benchmarks/lora.py [STEPS]   (default 30 training steps each)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync.learning.lora import AdaptedLM, LoraSettings, load_tokenizer  # noqa: E402
from fedsync.learning.text import encode  # noqa: E402
from fedsync.learning.train import TrainSettings, local_train  # noqa: E402
from tests.lm_files import corpus, make_base  # noqa: E402

QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 32768}


def adapter_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters)."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def qwen_shapes() -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_05B))
        return adapter_fraction(get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")))


def tokens_per_s(base: Path, steps: int) -> tuple[float, float]:
    """(fedsync's worker loop, a bare PEFT loop) on the same data, batch 8 of 128 tokens, SGD lr 0.05."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    texts = [{"text": " ".join(corpus()[i % 12:] + corpus()[:i % 12])} for i in range(64)]
    data = encode(texts, load_tokenizer(base), 128, print)
    tokens = 8 * 128 * steps
    model = AdaptedLM(base, LoraSettings(dropout=0.0))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None,
                             steps=steps)
    local_train(model, data, TrainSettings(**{**settings.__dict__, "steps": 2}), "cpu", seed=0)  # warm
    started = time.perf_counter()
    local_train(model, data, settings, "cpu", seed=1)
    ours = tokens / (time.perf_counter() - started)

    torch.manual_seed(0)
    bare = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    optimizer = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    order = torch.randperm(len(data))

    def step(i: int) -> None:
        idx = order[(i * 8) % len(data):(i * 8) % len(data) + 8]
        logits = bare(input_ids=data.x[idx]).logits
        loss = F.cross_entropy(logits.transpose(1, 2), data.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(2):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return ours, tokens / (time.perf_counter() - started)


def main(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_base(Path(tmp) / "tiny")
        adapter, full = adapter_fraction(AdaptedLM(tiny, LoraSettings()))
        print(f"tiny Llama-style model (hidden 128, 2 layers): adapter {adapter * 4 / 1e3:.1f} kB of "
              f"{full * 4 / 1e6:.2f} MB = {adapter / full:.4f}x (goal <= 0.02x at rank 8)")
        adapter, full = qwen_shapes()
        print(f"Qwen2.5-0.5B's shapes: adapter {adapter:,} parameters ({adapter * 4 / 1e6:.2f} MB in float32) of "
              f"{full:,} ({full * 2 / 1e9:.2f} GB in bf16) = {adapter / full:.5f}x")
        mid = make_base(Path(tmp) / "mid", hidden=256, layers=4, vocab=2000)
        ours, bare = tokens_per_s(mid, steps)
        print(f"training, Llama-style hidden 256, 4 layers, batch 8 x 128 tokens, CPU: fedsync's worker loop "
              f"{ours:.0f} tokens/s, a bare PEFT loop {bare:.0f} tokens/s = {ours / bare:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
