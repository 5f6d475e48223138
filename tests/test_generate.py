"""Prompts for a causal_lm inference job, on a tiny Llama-style model built offline (tests/lm_files.py): a JSON
lines file of prompts checked line by line and cut into chunks of its own lines; prompts and chats into token ids;
continuations that do not depend on which prompts share a batch; a worker's texts checked before they are taken;
the merged JSON lines file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsync.base.errors import DataError
from fedsync.learning.generate import Continued, continue_prompts
from fedsync.learning.inputs import joined, open_inputs, split
from fedsync.learning.lora import AdaptedLM, LoraSettings, load_tokenizer
from fedsync.learning.text import prompt_ids, prompt_record
from fedsync.run.submitting.jobs import OutputRefused, prompt_chunk_rows, read_texts
from fedsync.run.submitting.predictions import write_generations
from fedsync.storage.markers import Generation, MarkerError

from .lm_files import make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("lm") / "base")


def test_a_prompts_file_is_checked_line_by_line_and_cut_into_its_own_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": "water the", "id": "a"}), "",
             json.dumps({"messages": [{"role": "user", "content": "ünïcode"}]}), json.dumps({"prompt": "x", "id": 7})]
    path = tmp_path / "p.jsonl"
    path.write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    inputs = open_inputs(path, (24,), False, takes_prompts=True)
    assert inputs.kind == "prompts" and inputs.rows == 3
    chunk = inputs.chunk(1, 3)
    assert split(chunk["bytes"], chunk["offsets"], 2) == [lines[2].encode(), lines[3].encode()]
    assert inputs.ids_of(0, 3) == ["a", "1", "7"]  # a prompt without an id is named by its index
    for text, why in (('{"prompt": "ok"}\n[1, 2]\n', "p.jsonl:2: holds neither"),
                      ('{"prompt": "ok"}\n\n{oops\n', "p.jsonl:3: not JSON"),
                      ('{"prompt": "ok", "id": [1]}\n', "p.jsonl:1: its `id` is neither"),
                      ("\n\n", "holds no prompt")):
        path.write_text(text)
        with pytest.raises(DataError, match=why):
            open_inputs(path, (24,), False, takes_prompts=True)
    with pytest.raises(DataError, match="JSON lines file"):
        open_inputs(tmp_path / "missing.jsonl", (24,), False, takes_prompts=True)


def test_prompts_and_chats_become_the_ids_training_saw_begin(base: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(base)
    assert prompt_ids(prompt_record('{"prompt": "water the"}'), tokenizer) == tokenizer("water the")["input_ids"]
    chat = {"messages": [{"role": "user", "content": "tell me"}]}
    rendered = tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
    assert prompt_ids(chat, tokenizer) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    plain = load_tokenizer(make_base(tmp_path / "plain", chat_template=False))
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(chat, plain)


def test_continuations_do_not_depend_on_their_batch_and_long_prompts_are_cut_and_counted(base: Path) -> None:
    tokenizer = load_tokenizer(base)
    model = AdaptedLM(base, LoraSettings())
    texts = ["water the", "tack the boat across the bay", "the", "season the soup with salt and pepper " * 4]
    prompts = [prompt_ids({"prompt": t}, tokenizer) for t in texts]
    greedy = Generation(max_new_tokens=5)
    together = continue_prompts(model, tokenizer, prompts, greedy, 16, "cpu", "fp32", 4, seed=0)
    alone = [continue_prompts(model, tokenizer, [p], greedy, 16, "cpu", "fp32", 1, seed=0)[0] for p in prompts]
    assert together == alone
    assert [c.dropped for c in together] == [max(0, len(p) - 16) for p in prompts] and together[3].dropped > 0
    assert all(0 <= c.tokens <= 5 for c in together)
    sampled = Generation(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    first = continue_prompts(model, tokenizer, prompts, sampled, 16, "cpu", "fp32", 2, seed=5)
    assert continue_prompts(model, tokenizer, prompts, sampled, 16, "cpu", "fp32", 2, seed=5) == first
    assert prompt_chunk_rows(10) == 2 and prompt_chunk_rows(1000) == 32 and prompt_chunk_rows(1) == 1
    with pytest.raises(MarkerError, match="max_new_tokens"):
        Generation(max_new_tokens=0)
    with pytest.raises(MarkerError, match="top_p"):
        Generation(top_p=0.0)


def _output(texts: list[str], tokens: list[int] | None = None) -> dict[str, torch.Tensor]:
    n = len(texts)
    return {**joined([t.encode() for t in texts]), "tokens": torch.tensor(tokens or [1] * n),
            "dropped": torch.zeros(n, dtype=torch.int64)}


def test_a_workers_texts_are_checked_before_they_are_taken() -> None:
    good = _output(["héllo", ""], [2, 0])
    assert read_texts(good, 2) == [Continued("héllo", 2, 0), Continued("", 0, 0)]
    broken = dict(good, bytes=torch.tensor([0xff, 0xfe], dtype=torch.uint8),
                  offsets=torch.tensor([0, 1, 2], dtype=torch.int64))
    cases = {"wrong_tensors": {**good, "logits": torch.zeros(2, 3)},
             "wrong_shape": dict(good, offsets=torch.tensor([0, 9, 3], dtype=torch.int64)),
             "not_utf8": broken}
    for reason, tensors in cases.items():
        with pytest.raises(OutputRefused) as e:
            read_texts(tensors, 2)
        assert e.value.reason == reason
    with pytest.raises(OutputRefused, match="counts"):
        read_texts(dict(good, tokens=torch.tensor([-1, 0])), 2)
    with pytest.raises(OutputRefused, match="3 texts"):
        read_texts(good, 3)


def test_continuations_are_merged_in_order_with_each_problem_named(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    chunks = [(["a", "b"], [Continued("one", 1, 0), Continued("", 0, 0)], {1: "bad_prompt: not JSON"}),
              (["c"], None, {0: "wrong_inputs: not prompts"})]
    written = write_generations(out, 3, iter(chunks))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert written.rows == 3 and written.failed == 2 and written.beside is None
    assert rows[0] == {"index": 0, "id": "a", "generation": "one", "tokens": 1, "prompt_tokens_dropped": 0,
                       "problem": None}
    assert rows[1]["generation"] is None and rows[1]["problem"] == "bad_prompt: not JSON"
    assert rows[2]["problem"] == "wrong_inputs: not prompts"
    with pytest.raises(ValueError, match="merged 3 prompts, the job has 4"):
        write_generations(tmp_path / "short.jsonl", 4, iter(chunks))
    assert not (tmp_path / "short.jsonl").exists() and not list(tmp_path.glob(".*tmp"))
