"""A tiny Llama-style base model made offline, as the causal_lm tests need one (nothing can be downloaded): a
byte-level BPE tokenizer trained with `tokenizers` on the given text, with a chat template, and a model of random
weights from a LlamaConfig, both saved in Hugging Face's own folder format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOPICS = {
    "cooking": ["stir the onions in butter until soft", "bake the bread for forty minutes",
                "season the soup with salt and pepper", "chop the garlic and fry it in oil"],
    "sailing": ["trim the main sail when the wind rises", "tack the boat across the bay",
                "tie the bow line to the cleat", "reef the sail before the storm"],
    "gardening": ["water the tomatoes every morning", "plant the bulbs in early autumn",
                  "prune the roses after they bloom", "spread compost over the beds"],
}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def corpus() -> list[str]:
    return [t for texts in TOPICS.values() for t in texts]


def make_base(folder: Path, seed: int = 0, hidden: int = 128, layers: int = 2, vocab: int = 400,
              chat_template: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus() * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_texts(folder: Path, topic: str, copies: int = 8, chat: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for text in TOPICS[topic] * copies:
        record = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": text}]} \
            if chat else {"text": text}
        lines.append(json.dumps(record))
    (folder / f"{topic}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
