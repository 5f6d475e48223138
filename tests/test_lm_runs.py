"""Federated LoRA fine-tuning with real processes (the causal_lm task): three workers, each with private text on
its own topic, adapt a tiny Llama-style base model built offline (tests/lm_files.py); the coordinator's held-out
text covers every topic. Its loss falls round over round and ends below what any worker reaches alone on its own
text; only adapters travel; a worker with another base model is refused before it writes anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedsync.learning.lora import AdaptedLM, LoraSettings, load_tokenizer
from fedsync.learning.text import encode, read_records
from fedsync.learning.train import TrainSettings, evaluate, local_train
from fedsync.storage.jobfiles import list_jobs, read_plan
from fedsync.storage.markers import Assignment, Evaluation, FinalMarker, Summary, UpdateMarker
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified

from .helpers import finish, killed_on_error, run, start
from .lm_files import TOPICS, make_base, write_texts

pytestmark = pytest.mark.processes
ROUNDS, EPOCHS, LR, LENGTH = 4, 3, 0.1, 24


def _held_out(folder: Path, topics: tuple[str, ...] = tuple(TOPICS)) -> Path:
    folder.mkdir()
    (folder / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for topic in topics
                                               for t in TOPICS[topic]))
    return folder


def _run(share: Path, base: Path, held: Path, own: dict[str, Path], rounds: int, *settings: str,
         serving: bool = False) -> tuple[str, str, list[subprocess.Popen[str]]]:
    """A causal_lm run to its end: the coordinator on the held-out text, one worker per topic on its own; their
    outputs, and the workers still serving inference jobs when `serving` (the caller stops them)."""
    coord = start("coordinator", "--share", str(share), "--config", "causal_lm", "--rounds", str(rounds),
                  "--base-model", str(base), "--data", str(held), "--set", f"min_workers={len(own)}", "--set",
                  f"max_length={LENGTH}", "--set", f"lr={LR}", *settings)
    workers = [start("worker", "--share", str(share), "--name", t, "--base-model", str(base), "--data", str(d),
                     "--device", "cpu", "--wait-for-run", "60", *(["--serve"] if serving else []))
               for t, d in own.items()]
    with killed_on_error(coord, *workers):
        out = finish(coord, timeout=240)
        outs = "" if serving else "".join(finish(w, timeout=60) for w in workers)
    assert coord.returncode == 0 and all(w.returncode in (None, 0) for w in workers), out + outs
    assert "Traceback" not in out + outs
    return out, outs, workers if serving else []


def _alone(base: Path, own: Path, held: Path) -> float:
    """One worker's adapters trained on its own text for the whole run's epochs, on the held-out text."""
    tokenizer = load_tokenizer(base)
    model = AdaptedLM(base, LoraSettings())
    settings = TrainSettings(epochs=ROUNDS * EPOCHS, batch_size=8, lr=LR, momentum=0.9, weight_decay=0.0, augment=None)
    local_train(model, encode(read_records(own), tokenizer, LENGTH, print), settings, "cpu", seed=1)
    return evaluate(model, encode(read_records(held), tokenizer, LENGTH, print), 16)[0]


def _loads_with_peft_as_the_readme_says(base: Path, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """README's lines load the exported adapter onto the base, and that model is the run's final one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "adapter")' in readme
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    ids = tokenizer("water the", return_tensors="pt")["input_ids"]
    ours = AdaptedLM(base, LoraSettings())
    ours.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours.eval()(ids).transpose(1, 2))
        generated = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def _generated_with_peft(base: Path, folder: Path, prompts: list[str], new: int) -> list[str]:
    """Each prompt continued greedily, one at a time, by PEFT's own model on the exported adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, -LENGTH:]
        with torch.no_grad():
            made = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in made:
            made = made[:made.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(made, skip_special_tokens=True))
    return texts


def _continued_by_serving_workers(share: Path, base: Path, workers: list[subprocess.Popen[str]], adapter: Path,
                                  tmp_path: Path) -> None:
    """`fedsync infer` with prompts: the run's workers, serving after it ended, continue them with its adapters,
    the same text PEFT writes; a long prompt's cut is counted, a chat prompt answered, a bad line refused before
    anything is written. The workers are stopped at the end."""
    prompts = ["water the", "tack the boat", "season the soup with salt and pepper " * 6]
    lines = [json.dumps({"prompt": p, "id": f"p{i}"}) for i, p in enumerate(prompts)]
    lines += [json.dumps({"messages": [{"role": "user", "content": "tell me"}]}), ""]  # a chat; a blank line
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    s = Share(share)
    bad = run("infer", "--share", str(share), "--inputs", str(tmp_path / "bad.jsonl"), "--out",
              str(tmp_path / "bad-out.jsonl"), "--base-model", str(base))
    assert bad.returncode != 0 and "bad.jsonl:2: not JSON" in bad.stderr, bad.stdout + bad.stderr
    assert not s.exists("jobs") or not list_jobs(s)
    done = run("infer", "--share", str(share), "--inputs", str(tmp_path / "prompts.jsonl"), "--out",
               str(tmp_path / "out.jsonl"), "--base-model", str(base), "--max-new-tokens", "6", "--chunk-rows", "2",
               timeout=180)
    for w in workers:
        w.terminate()
    logs = "".join(finish(w, timeout=30) for w in workers)
    assert done.returncode == 0 and "continued 4 prompts" in done.stdout, done.stdout + done.stderr + logs
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["id"] for r in rows] == ["p0", "p1", "p2", "3"]
    assert [r["generation"] for r in rows[:3]] == _generated_with_peft(base, adapter, prompts, 6)
    assert all(r["problem"] is None and 0 <= r["tokens"] <= 6 for r in rows) and rows[0]["tokens"] > 0, rows
    assert rows[2]["prompt_tokens_dropped"] > 0 and rows[0]["prompt_tokens_dropped"] == 0
    plan = read_plan(s, list_jobs(s)[0])
    # the only problem a healthy job may show: a chunk copied to an idle worker at the end, its second output not
    # taken (PROTOCOL 5.14, "Routing")
    assert plan is not None and plan.state == "done" and all(p.reason == "duplicate" for p in plan.problems), plan


def test_three_workers_adapt_a_language_model_better_than_any_alone(share: Path, tmp_path: Path) -> None:
    base, other = make_base(tmp_path / "base"), make_base(tmp_path / "other", seed=1)
    held = _held_out(tmp_path / "held")
    own = {t: write_texts(tmp_path / t, t) for t in TOPICS}
    out, _, serving = _run(share, base, held, own, ROUNDS, "--set", f"local_epochs={EPOCHS}", "--set",
                           "federated_eval=0.25", serving=True)
    s = Share(share)
    losses = [s.read_record(Evaluation, s.evaluation(r)).test_loss for r in range(1, ROUNDS + 1)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # perplexity e^loss falls round over round
    alone = {t: _alone(base, d, held) for t, d in own.items()}
    assert losses[-1] < min(alone.values()), (losses, alone)
    final = s.read_record(FinalMarker, s.final_marker)
    state = load_verified(s, s.final_model, final.model)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # only the adapters travel
    full = sum(p.numel() for p in AdaptedLM(base, LoraSettings()).parameters())
    assert sum(v.numel() for v in state.values()) <= 0.02 * full
    summary = s.read_record(Summary, s.summary(ROUNDS))
    assert sorted(x.worker for x in summary.accepted) == sorted(TOPICS)
    first = s.read_record(Summary, s.summary(1)).federated  # the initial model on the workers' own held-out text
    assert first is not None and summary.federated is not None and 0 < summary.federated.loss < first.loss
    assert all(torch.isfinite(v).all() for v in state.values())
    scored = run("eval", "--share", str(share), "--base-model", str(base), "--data", str(held), "--json")
    assert scored.returncode == 0 and json.loads(scored.stdout)["test_loss"] == pytest.approx(losses[-1], rel=1e-4)
    exported = run("export", str(tmp_path / "adapter"), "--share", str(share), "--base-model", str(base))
    assert exported.returncode == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), exported
    _loads_with_peft_as_the_readme_says(base, tmp_path / "adapter", state)
    with killed_on_error(*serving):
        _continued_by_serving_workers(share, base, serving, tmp_path / "adapter", tmp_path)
    refused = run("worker", "--share", str(share), "--name", "intruder", "--base-model", str(other), "--data",
                  str(own["cooking"]), "--device", "cpu", "--wait-for-run", "10", timeout=60)
    assert refused.returncode == 3 and "is not run" in refused.stderr + refused.stdout, refused
    assert not s.exists(s.worker_file("intruder"))
    four_bit = run("worker", "--share", str(share), "--name", "small-gpu", "--base-model", str(base), "--data",
                   str(own["cooking"]), "--device", "cpu", "--quantize", "4bit", "--wait-for-run", "10", timeout=60)
    assert four_bit.returncode == 3 and "--quantize 4bit needs a CUDA GPU" in four_bit.stderr, four_bit
    assert not s.exists(s.worker_file("small-gpu"))


def test_adapters_travel_masked_with_steps_sized_in_tokens(share: Path, tmp_path: Path) -> None:
    """What a run does to any model's updates it does to adapters: masked and summed by secure aggregation, each
    worker's steps sized by its speed (said in tokens); the loss falls. (Compression and server optimizers on
    adapters: tests/test_lora.py; sealed updates: every run's default.)"""
    base, held = make_base(tmp_path / "base"), _held_out(tmp_path / "held", ("cooking", "sailing"))
    own = {t: write_texts(tmp_path / t, t) for t in ("cooking", "sailing")}
    _, outs, _ = _run(share, base, held, own, 3, "--set", "secure_aggregation=true",
                      "--set", "clip_norm=5", "--set", "min_updates=2", "--set", "balance=throughput")
    s = Share(share)
    losses = [s.read_record(Evaluation, s.evaluation(r)).test_loss for r in (1, 2, 3)]
    assert losses[-1] < losses[0], losses
    for r in (1, 2, 3):
        for w in own:
            m = s.read_record(UpdateMarker, s.update_marker(r, w))
            assert m.encoding == "secagg" and m.encryption == "none", m  # masked words, not the adapter
    first = s.read_record(Summary, s.summary(1))
    assert sorted(x.worker for x in first.accepted) == sorted(own)
    state = load_verified(s, s.final_model, s.read_record(FinalMarker, s.final_marker).model)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert run("verify", "--share", str(share)).returncode == 0
    tasks = s.read_record(Assignment, s.assignment(2)).workers
    assert all(t.local_steps is not None and t.local_steps >= 1 for t in tasks.values()), tasks
    status = run("status", "--share", str(share)).stdout
    assert status.count(" tokens/s") == 2 and "tokens/s) in " in outs, status
