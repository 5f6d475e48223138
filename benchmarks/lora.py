"""Federated LoRA's two figures, each beside its baseline measured in the same run:

1. Bytes a round moves: the adapter (what a worker sends, what the coordinator publishes) against the full model,
   for the tiny Llama-style model the tests build (goal <= 0.02x at rank 8) and for Qwen2.5-0.5B's shapes (its
   published config; random weights on the meta device, nothing downloaded).
2. Tokens per second of a worker's training (fedsync's own loop over the causal_lm task's data and model) against
   a bare PEFT training loop on the same base, data, batch, optimizer and precision (goal >= 0.9x), and on a CUDA
   GPU the peak memory of each.
3. The base's bytes as a worker holds it (fp32, bf16 or fp16, 4-bit NF4), for Qwen2.5-0.5B's shapes.

Usage: python benchmarks/lora.py [--steps 30] [--device cpu] [--model mid|qwen0.5b] [--length 128]
                                 [--quantize 4bit]
  mid: a Llama-style model of hidden 256, 4 layers (the CPU figure); qwen0.5b: Qwen2.5-0.5B's shapes with random
  weights (saved once to a temporary folder: nothing is downloaded), for a GPU. The precision is what a worker
  picks on the device (fedsync/learning/device.py, for a language model); --quantize 4bit holds the base in 4 bits
  in both loops (CUDA).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsync.learning.device import DeviceFacts, choose_precision, describe  # noqa: E402
from fedsync.learning.lora import AdaptedLM, BaseStorage, LoraSettings, base_storage, load_tokenizer  # noqa: E402
from fedsync.learning.text import encode  # noqa: E402
from fedsync.learning.train import AUTOCAST, TrainSettings, local_train  # noqa: E402
from tests.lm_files import corpus, make_base  # noqa: E402

QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 32768}


def adapter_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters)."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def qwen_shapes() -> tuple[int, int, int]:
    """(adapter parameters, all parameters, those in the decoder's linear layers: what 4 bits hold)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_05B))
        linear = sum(m.weight.numel() for n, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
        return (*adapter_fraction(get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))),
                linear)


def qwen_base(folder: Path) -> Path:
    """A Qwen2.5-0.5B-shaped model of random weights in bf16 (1 GB), with the tiny test tokenizer's ids mapped
    into its vocabulary: the speed of a real small model's shapes, nothing downloaded."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    make_base(folder)  # the tokenizer (and a tiny model, replaced below)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_05B), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def peak_memory(device: str) -> float | None:
    """GB of GPU memory allocated at the peak since the last reset; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def tokens_per_s(base: Path, steps: int, device: str, precision: str, storage: BaseStorage,
                 length: int) -> tuple[tuple[float, float | None], tuple[float, float | None]]:
    """((tokens/s, peak GB) of fedsync's worker loop, the same of a bare PEFT loop) on the same data, batch 8 of
    `length` tokens, SGD lr 0.05 with momentum, in `precision` on a base held as `storage`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    texts = [{"text": " ".join(corpus()[i % 12:] + corpus()[:i % 12]) * max(1, length // 96)} for i in range(64)]
    data = encode(texts, load_tokenizer(base), length, lambda _: None)
    tokens = 8 * length * steps
    reset_memory(device)
    model = AdaptedLM(base, LoraSettings(dropout=0.0), storage=storage)
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None,
                             steps=steps, precision=precision)
    local_train(model, data, TrainSettings(**{**settings.__dict__, "steps": 2}), device, seed=0)  # warm
    started = time.perf_counter()
    local_train(model, data, settings, device, seed=1)
    ours = (tokens / (time.perf_counter() - started), peak_memory(device))
    del model
    reset_memory(device)

    torch.manual_seed(0)
    if storage.four_bit is None:
        bare = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=storage.dtype).to(device),
                              LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    else:  # the 4-bit load is QLoRA's recipe whoever writes the loop: the PEFT model AdaptedLM holds, run bare
        bare = AdaptedLM(base, LoraSettings(dropout=0.0), storage=storage).peft.train()
    params = [p for p in bare.parameters() if p.requires_grad]
    kind = device.split(":")[0]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=kind == "cuda" or None)
    scaler = torch.amp.GradScaler(kind, enabled=precision == "fp16")
    x, y = data.x.to(device), data.y.to(device)
    order = torch.randperm(len(data), device=device)

    def step(i: int) -> None:
        idx = order[(i * 8) % len(data):(i * 8) % len(data) + 8]
        with torch.autocast(kind, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            logits = bare(input_ids=x[idx]).logits
            loss = F.cross_entropy(logits.transpose(1, 2), y[idx])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for i in range(2):
        step(i)
    if kind == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    if kind == "cuda":
        torch.cuda.synchronize(device)
    return ours, (tokens / (time.perf_counter() - started), peak_memory(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("mid", "qwen0.5b"), default="mid")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--quantize", choices=("4bit",), default=None)
    args = parser.parse_args()
    facts = DeviceFacts.probe()
    precision = choose_precision("auto", args.device, facts, weights_bound=True)
    storage = base_storage(precision, args.device, args.quantize)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_base(Path(tmp) / "tiny")
        adapter, full = adapter_fraction(AdaptedLM(tiny, LoraSettings()))
        print(f"tiny Llama-style model (hidden 128, 2 layers): adapter {adapter * 4 / 1e3:.1f} kB of "
              f"{full * 4 / 1e6:.2f} MB = {adapter / full:.4f}x (goal <= 0.02x at rank 8)")
        adapter, full, linear = qwen_shapes()
        print(f"Qwen2.5-0.5B's shapes: adapter {adapter:,} parameters ({adapter * 4 / 1e6:.2f} MB in float32) of "
              f"{full:,} ({full * 2 / 1e9:.2f} GB in bf16) = {adapter / full:.5f}x")
        four = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (full - linear) * 2  # 8-bit scales of 64 weights, fp32 of 256
        print(f"Qwen2.5-0.5B's base as a worker holds it: fp32 {full * 4 / 1e9:.2f} GB, bf16 or fp16 "
              f"{full * 2 / 1e9:.2f} GB, 4-bit NF4 {four / 1e9:.2f} GB (its {linear:,} decoder weights in 4 bits "
              f"and their scales; the {full - linear:,} of embeddings and norms stay bf16)")
        base = qwen_base(Path(tmp) / "qwen") if args.model == "qwen0.5b" else \
            make_base(Path(tmp) / "mid", hidden=256, layers=4, vocab=2000)
        what = "Qwen2.5-0.5B's shapes" if args.model == "qwen0.5b" else "Llama-style hidden 256, 4 layers"
        name = describe(args.device, facts)[0]
        held = "4-bit NF4" if storage.four_bit else str(storage.dtype).removeprefix("torch.")
        (ours, ours_gb), (bare, bare_gb) = tokens_per_s(base, args.steps, args.device, precision, storage,
                                                        args.length)
        memory = f"; peak memory {ours_gb:.2f} GB vs {bare_gb:.2f} GB" if ours_gb is not None else ""
        print(f"training, {what}, batch 8 x {args.length} tokens, {name} ({args.device}), {precision}, base held in "
              f"{held}: fedsync's worker loop {ours:.0f} tokens/s, a bare PEFT loop {bare:.0f} tokens/s = "
              f"{ours / bare:.2f}x (goal >= 0.9x){memory}")


if __name__ == "__main__":
    main()
