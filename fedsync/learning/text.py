"""A worker's private text for the causal_lm task, read from its own folder: JSON lines files (`*.jsonl`), each
line an object with `text` (a string) or `messages` (a chat: a list of {role, content}, rendered with the base
model's own chat template). Every example becomes `max_length` token ids and their next-token labels, so the
training loop's cross-entropy over (batch, vocabulary, positions) is the language-modelling loss.

Nothing is dropped silently: a line that is not JSON or holds neither field stops the load with its file and line;
texts longer than `max_length` tokens are truncated and counted in the note.

Prompts for `fedsync infer` are JSON lines too: `prompt` (a string the model continues) or `messages` (a chat the
model answers, rendered with the chat template's generation prompt), and optionally an `id`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsync.base.errors import DataError
from fedsync.learning.data import Split
from fedsync.learning.train import IGNORE


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every line of every `*.jsonl` file in `folder`, in name order, checked."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give the folder of this machine's JSON lines files with --data")
    records: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(_line(line, "text"))
            except ValueError as e:
                raise DataError(f"{path}:{number}: {e}") from None
    if not records:
        raise DataError(f"{folder} holds no text: put JSON lines files (*.jsonl, one {{\"text\": ...}} or "
                        "{\"messages\": [...]} per line) there")
    return records


def prompt_record(line: bytes | str) -> dict[str, Any]:
    """One prompt line, checked: a ValueError says what is wrong with it."""
    record = _line(line, "prompt")
    if "id" in record and not isinstance(record["id"], (str, int)):
        raise ValueError("its `id` is neither a string nor an integer")
    return record


def _line(line: bytes | str, field: str) -> dict[str, Any]:
    """One JSON lines record holding `field` (a string) or `messages` (a chat); a ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({getattr(e, 'msg', e)}); each line must be one JSON object") from None
    if not isinstance(record, dict) or not (isinstance(record.get(field), str) or _is_chat(record)):
        raise ValueError(f"holds neither `{field}` (a string) nor `messages` (a list of {{role, content}})")
    return record


def _is_chat(record: dict[str, Any]) -> bool:
    messages = record.get("messages")
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


def token_ids(record: dict[str, Any], tokenizer: Any) -> list[int]:
    """One example's token ids: its text with the tokenizer's own special tokens and an end-of-text, or its chat
    rendered by the base model's chat template."""
    if "messages" in record and _is_chat(record):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the data holds chats (`messages`) but the base model's tokenizer has no chat template: "
                            "give plain `text` lines, or a base model with a chat template")
        return _chat_ids(record["messages"], tokenizer, answer=False)
    ids = list(tokenizer(record["text"])["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_ids(record: dict[str, Any], tokenizer: Any) -> list[int]:
    """A prompt's token ids, as training saw such text begin: its `prompt` with the tokenizer's own special tokens
    (no end-of-text: the model goes on), or its chat rendered with the template's generation prompt."""
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("a chat prompt (`messages`), and the base model's tokenizer has no chat template")
        return _chat_ids(record["messages"], tokenizer, answer=True)
    return list(tokenizer(record["prompt"])["input_ids"])


def _chat_ids(messages: list[dict[str, str]], tokenizer: Any, answer: bool) -> list[int]:
    """A chat's token ids as the base model's own template renders it (with its generation prompt when the model
    is to `answer`); the template writes its own special tokens."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def encode(records: list[dict[str, Any]], tokenizer: Any, max_length: int,
           note: Callable[[str], None]) -> Split:
    """The records as a Split: x the first `max_length` token ids (right-padded), y each position's next token
    (IGNORE past the end). A causal model never looks ahead, so right padding needs no attention mask."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    x = torch.full((len(records), max_length), pad, dtype=torch.int64)
    y = torch.full((len(records), max_length), IGNORE, dtype=torch.int64)
    truncated = 0
    for i, record in enumerate(records):
        ids = token_ids(record, tokenizer)
        if len(ids) > max_length + 1:
            truncated += 1
            ids = ids[:max_length + 1]
        n = min(len(ids), max_length)
        x[i, :n] = torch.tensor(ids[:n])
        y[i, :len(ids) - 1] = torch.tensor(ids[1:])
    if truncated:
        note(f"{truncated} of {len(records)} texts are longer than max_length={max_length} tokens: truncated to it "
             "(raise max_length to keep more)")
    return Split(x, y)
