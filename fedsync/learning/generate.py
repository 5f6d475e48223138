"""A language model's continuations of prompts for an inference job (causal_lm): prompts batched by length with
padding on the left (a causal model's new tokens then follow every prompt at once), greedy unless the job asks
for sampling, in the precision the worker trains in. A prompt longer than the run's `max_length` keeps its last
`max_length` tokens, and how many it lost is said beside its text: counted, never silent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedsync.learning.lora import AdaptedLM
from fedsync.learning.train import AUTOCAST
from fedsync.storage.markers import Generation


@dataclass(frozen=True)
class Continued:
    text: str
    tokens: int   # tokens generated
    dropped: int  # prompt tokens cut from its start to fit max_length


@torch.inference_mode()
def continue_prompts(model: AdaptedLM, tokenizer: Any, prompts: list[list[int]], settings: Generation,
                     max_length: int, device: str, precision: str, batch_size: int, seed: int) -> list[Continued]:
    """Each prompt's continuation, in the prompts' order."""
    kind = device.split(":")[0]
    model.to(device).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    kept = [ids[-max_length:] for ids in prompts]
    order = sorted(range(len(kept)), key=lambda i: len(kept[i]))  # similar lengths share a batch: less padding
    made: dict[int, tuple[str, int]] = {}
    seeds = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[torch.device(device)] if kind == "cuda" else []):  # the worker's own stream
        for start in range(0, len(order), batch_size):  # is left as it was
            rows = order[start:start + batch_size]
            seeded = int(torch.randint(0, 2**31 - 1, (), generator=seeds))
            made.update(zip(rows, _batch(model, tokenizer, [kept[i] for i in rows], settings, pad, eos, device,
                                         precision, seeded)))
    return [Continued(*made[i], len(prompts[i]) - len(kept[i])) for i in range(len(prompts))]


def _batch(model: AdaptedLM, tokenizer: Any, batch: list[list[int]], settings: Generation, pad: int, eos: int | None,
           device: str, precision: str, seed: int) -> list[tuple[str, int]]:
    """One batch of prompts, left-padded: each one's new text and how many tokens it is."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(batch), width), dtype=torch.int64)
    for j, prompt in enumerate(batch):
        ids[j, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        mask[j, width - len(prompt):] = 1
    torch.manual_seed(seed)
    sampling = settings.temperature > 0
    kind = device.split(":")[0]
    with torch.autocast(kind, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
        made = model.peft.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=settings.max_new_tokens,
            do_sample=sampling, pad_token_id=pad, eos_token_id=eos,
            **({"temperature": settings.temperature, "top_p": settings.top_p} if sampling else
               {"temperature": None, "top_p": None, "top_k": None}))
    texts = []
    for row in made[:, width:].tolist():
        new = row[:row.index(eos)] if eos is not None and eos in row else row
        texts.append((tokenizer.decode(new, skip_special_tokens=True), len(new)))
    return texts
