"""The causal_lm task's parts on a tiny Llama-style model built offline (tests/lm_files.py): JSON lines text and
chats into token ids and next-token labels, with every bad input named; a base model with LoRA adapters whose state
is the adapters alone; training it with fedsync's own loop lowers the loss; the base is named by its weights'
hash."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.optimizers import ServerSettings, make_optimizer
from fedsync.aggregation.rules import FedAvg
from fedsync.base.errors import ConfigError, DataError
from fedsync.learning.lora import AdaptedLM, LoraSettings, base_hash, load_tokenizer
from fedsync.learning.models import data_buffers
from fedsync.learning.text import encode, read_records
from fedsync.learning.train import IGNORE, TrainSettings, evaluate, local_train
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FileRef
from fedsync.tensors import encoding as codec
from fedsync.tensors.files import layout_of, state_bytes

from .lm_files import make_base, write_texts


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("lm") / "base")


def test_text_and_chats_become_ids_and_next_token_labels(base: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(base)
    write_texts(tmp_path / "a", "cooking", copies=1)
    write_texts(tmp_path / "a", "sailing", copies=1, chat=True)
    records = read_records(tmp_path / "a")
    assert len(records) == 8
    said: list[str] = []
    data = encode(records, tokenizer, 64, said.append)
    assert data.x.shape == data.y.shape == (8, 64) and said == []
    ids = tokenizer("stir the onions in butter until soft")["input_ids"] + [tokenizer.eos_token_id]
    assert data.x[0, :len(ids)].tolist() == ids and data.y[0, :len(ids) - 1].tolist() == ids[1:]
    assert (data.y[0, len(ids) - 1:] == IGNORE).all()
    chat = tokenizer.apply_chat_template(records[-1]["messages"], tokenize=False)
    assert chat.startswith("<s>user: tell me</s><s>assistant: ")
    short = encode(records, tokenizer, 4, said.append)
    assert short.x.shape == (8, 4) and said == ["8 of 8 texts are longer than max_length=4 tokens: truncated to it "
                                                "(raise max_length to keep more)"]


def test_bad_text_is_named_with_its_file_and_line(base: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no text"):
        read_records(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        read_records(tmp_path / "absent")
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not JSON"):
        read_records(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"title": "no"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: holds neither `text`"):
        read_records(tmp_path)
    plain = make_base(tmp_path / "plain", chat_template=False)
    write_texts(tmp_path / "chats", "sailing", copies=1, chat=True)
    with pytest.raises(DataError, match="has no chat template"):
        encode(read_records(tmp_path / "chats"), load_tokenizer(plain), 32, print)


def test_only_the_adapters_are_the_state_and_every_machine_starts_from_the_same(base: Path) -> None:
    model = AdaptedLM(base, LoraSettings(rank=8), seed=3)
    state = model.state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert all("q_proj" in k or "v_proj" in k for k in state)  # PEFT's defaults for Llama
    full = sum(p.numel() for p in model.parameters())
    adapter = sum(v.numel() for v in state.values())
    assert adapter / full <= 0.02, adapter / full  # the goal at rank 8 for the tiny model
    again = AdaptedLM(base, LoraSettings(rank=8), seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    moved = {k: v + 1.0 for k, v in state.items()}
    again.load_state_dict(moved)
    assert all(torch.equal(again.state_dict()[k], moved[k]) for k in state)
    with pytest.raises(ValueError, match="not this model's adapters"):
        again.load_state_dict({k: v for k, v in list(moved.items())[1:]})
    assert data_buffers(model) == []  # its rotary frequencies are fixed buffers outside its state


def test_training_the_adapters_with_fedsyncs_loop_lowers_the_loss(base: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(base)
    data = encode(read_records(write_texts(tmp_path / "t", "gardening")), tokenizer, 24, print)
    model = AdaptedLM(base, LoraSettings(rank=8, dropout=0.0), seed=0)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss0, _ = evaluate(model, data, 16)
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None, steps=40)
    local_train(model, data, settings, "cpu", seed=1)
    loss1, accuracy = evaluate(model, data, 16)
    assert loss1 < loss0 - 1.0 and math.exp(loss1) < math.exp(loss0) / 2, (loss0, loss1)
    targets = int(data.y.ne(IGNORE).sum())
    assert 0 < accuracy <= 1 and targets > len(data)  # token accuracy: per label, not per text
    assert any(not torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(base: Path, tmp_path: Path) -> None:
    data = encode(read_records(write_texts(tmp_path / "t", "sailing", copies=1)), load_tokenizer(base), 24, print)
    grads = []
    for checkpointing in (False, True):
        model = AdaptedLM(base, LoraSettings(dropout=0.0, gradient_checkpointing=checkpointing), seed=0).train()
        model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})  # lora_B off zero
        torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
        grads.append({n: p.grad.clone() for n, p in model.trained().items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_the_base_is_named_by_its_weights(base: Path, tmp_path: Path) -> None:
    same = base_hash(base)
    assert same == base_hash(base) and len(same) == 64
    other = make_base(tmp_path / "other", seed=1)
    assert base_hash(other) != same
    with pytest.raises(ConfigError, match="holds no model weights"):
        base_hash(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        AdaptedLM(tmp_path, LoraSettings())
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        load_tokenizer(tmp_path / "absent")


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_adapter_updates_compress_and_are_taken_in_as_any_models(base: Path, tmp_path: Path, encoding: str) -> None:
    """Adapter deltas encoded as workers send them, read back by the coordinator's real intake from files: the
    streamed mean is the mean of what the encoding keeps, at a fraction of float32's bytes."""
    state = AdaptedLM(base, LoraSettings()).state_dict()
    g = torch.Generator().manual_seed(2)
    deltas = [{k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in state.items()} for _ in range(3)]
    store = LocalStore(tmp_path)
    cands = []
    for i, d in enumerate(deltas):
        data = state_bytes(codec.encode(d, encoding))
        store.write(f"w{i}.safetensors", data)
        cands.append(Candidate(f"w{i}", f"w{i}.safetensors", FileRef(f"w{i}.safetensors", hash_bytes(data),
                                                                     len(data)), 1.0, encoding=encoding))
    sent = codec.encode(deltas[0], encoding)  # the tensors' bytes (a tiny adapter's file is half header)
    assert sum(v.numel() * v.element_size() for v in sent.values()) <= {"bf16": 0.5, "int8": 0.27}[encoding] * \
        sum(v.numel() * 4 for v in deltas[0].values())
    agg = Aggregator(layout_of(state), store)
    try:
        assert [o.problem for o in agg.take(cands)] == [None, None, None]
        got = FedAvg().aggregate(agg.collected(frozenset(state))).delta
    finally:
        agg.close()
    decoded = [codec.decode(codec.encode(d, encoding), encoding, state) for d in deltas]
    for k in state:
        torch.testing.assert_close(got[k], sum(d[k] for d in decoded) / 3, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_server_optimizer_steps_the_adapters_and_keeps_its_state_for_them(base: Path, tmp_path: Path,
                                                                           name: str) -> None:
    """The round's mean adapter delta (two workers' real training) through a server optimizer: every adapter
    moves, its state holds a tensor of the adapter's shape per moment, and it survives the safetensors file the
    coordinator keeps it in."""
    model = AdaptedLM(base, LoraSettings(dropout=0.0))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer, deltas = load_tokenizer(base), []
    for topic in ("cooking", "sailing"):
        model.load_state_dict(start)
        data = encode(read_records(write_texts(tmp_path / topic, topic)), tokenizer, 24, print)
        local_train(model, data, TrainSettings(epochs=1, batch_size=8, lr=0.05, momentum=0.0, weight_decay=0.0,
                                               augment=None, steps=4), "cpu", seed=1)
        deltas.append({k: v - start[k] for k, v in model.state_dict().items()})
    delta = {k: (deltas[0][k] + deltas[1][k]) / 2 for k in start}
    optimizer = make_optimizer(ServerSettings(name, 0.01) if name == "fedadam" else ServerSettings(name, 1.0, 0.9),
                               frozenset(start))
    stepped, state = optimizer.step(start, delta, {})
    moved = [k for k in start if not torch.equal(stepped[k], start[k])]
    assert sorted(moved) == sorted(k for k in start if delta[k].abs().sum() > 0)
    assert state and all(any(s.startswith(k) or k in s for s in state) for k in moved)
    again, _ = optimizer.step(stepped, delta, load(state_bytes(state)))  # the state as the share keeps it
    assert all(torch.isfinite(v).all() for v in again.values())
    if name == "fedadam":  # Adam moves each coordinate by at most about lr
        assert max(float((stepped[k] - start[k]).abs().max()) for k in start) <= 0.0101
