"""Using what a run trained: any closed round's model found and verified in the share, evaluated on this machine's
test data (`fedsync eval`), or written out with what it is (`fedsync export`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsync.base.errors import ConfigError, ShareError
from fedsync.base.logs import Log
from fedsync.learning.device import DeviceFacts, choose_device
from fedsync.learning.train import evaluate
from fedsync.run.config import RunConfig, config_from_dict, load_data, on_this_machine, test_examples
from fedsync.run.start import check_task
from fedsync.storage.local import atomic_write
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import Evaluation, FileRef, Manifest, Summary
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified, state_bytes

METADATA_PREFIX = "fedsync."


@dataclass
class RoundModel:
    """A closed round's aggregate: the model it produced, read from the share and checked against its summary."""

    manifest: Manifest
    config: RunConfig
    round: int
    ref: FileRef
    state: dict[str, torch.Tensor]
    test_accuracy: float | None  # the coordinator's evaluation of it, when one was written

    def model(self) -> torch.nn.Module:
        model = self.config.resolved_task().build_model(self.config.model)
        model.load_state_dict(self.state)
        return model.eval()


def round_model(share: Share, r: int | None) -> RoundModel:
    """Round r's model (None: the newest closed round's, the final model once the run finished). Its summary names
    it with its hash; after a run was continued the file it named may hold a later model, and the verified copy in
    the next round's global.safetensors is read instead."""
    manifest = read_manifest(share)
    config = config_from_dict(manifest.config, share.where(share.manifest))
    closed = share.closed_rounds()
    if not closed:
        raise ShareError(f"no round of run {manifest.run_id} in {share.where()} has closed yet: nothing to use")
    r = closed[-1] if r is None else r
    if r not in closed:
        raise ConfigError(f"round {r} of run {manifest.run_id} has not closed (closed: {closed[0]}..{closed[-1]})")
    summary = share.read_record(Summary, share.summary(r))
    state = None
    for name in dict.fromkeys((summary.model.file, share.global_model(r + 1))):
        try:
            state = load_verified(share, name, summary.model)
            break
        except Unusable:
            continue
    if state is None and config.keep_rounds is not None and r + 1 <= closed[-1] - config.keep_rounds:
        raise ShareError(f"round {r}'s model was removed by keep_rounds: {config.keep_rounds} (the run keeps the "
                         f"tensors of its last {config.keep_rounds} closed rounds): choose round "
                         f"{closed[-1] - config.keep_rounds} or later")
    if state is None:
        raise ShareError(f"round {r}'s model ({summary.model.file}, blake3 {summary.model.blake3[:12]}) is not in "
                         f"{share.where()} with that hash any more: `fedsync verify` says what is damaged")
    evaluation = share.read_record(Evaluation, share.evaluation(r)) if share.exists(share.evaluation(r)) else None
    return RoundModel(manifest, config, r, summary.model, state,
                      evaluation.test_accuracy if evaluation is not None else None)


@dataclass(frozen=True)
class Scored:
    round: int
    test_accuracy: float
    test_loss: float
    samples: int
    device: str
    seconds: float
    recorded_accuracy: float | None  # what the coordinator measured for this round, for comparison


def evaluate_round(share: Share, r: int | None, data_root: str | None, device: str, log: Log,
                   base_model: str | None = None) -> Scored:
    """Round r's model on this machine's test data for the task (the coordinator's choice of examples:
    `eval_samples`), on `device` (auto: the best this machine has); causal_lm on this machine's `base_model`."""
    found = round_model(share, r)
    found.config = on_this_machine(found.config, base_model)
    choice = choose_device(device, DeviceFacts.probe())
    if choice.fallback:
        log(f"WARNING: evaluating on the CPU although a GPU is present: {choice.fallback}")
    cfg = found.config
    test = test_examples(load_data(cfg, data_root or cfg.data_root, log)[1], cfg)  # the coordinator's very examples
    started = time.perf_counter()
    loss, accuracy = evaluate(found.model(), test, cfg.eval_batch_size, choice.device)
    return Scored(found.round, accuracy, loss, len(test), choice.device, time.perf_counter() - started,
                  found.test_accuracy)


def export_round(share: Share, r: int | None, out: Path, base_model: str | None = None) -> dict[str, str]:
    """Write round r's model to `out` (a file of the user's, outside the share) as safetensors whose metadata says
    what it is: task, model, round, test accuracy, the run and its config; or, for a task with its own layout
    (causal_lm: PEFT's adapter folder, on this machine's `base_model`), `out` is that folder and the same metadata
    goes into its fedsync.json. Returns that metadata."""
    found = round_model(share, r)
    found.config = on_this_machine(found.config, base_model)
    record = check_task(found.manifest, found.config)  # another task version, layout or base: refused
    metadata = {"task": found.config.task, "task_version": record.version, "layout": record.layout,
                "model": found.config.model, "round": str(found.round), "run_id": found.manifest.run_id,
                "test_accuracy": "" if found.test_accuracy is None else repr(found.test_accuracy),
                "blake3": found.ref.blake3, "config": json.dumps(found.config.as_dict(), sort_keys=True)}
    metadata = {METADATA_PREFIX + k: v for k, v in metadata.items()}
    task = found.config.resolved_task()
    if task.export is not None:
        task.export(found.model(), out)  # creates the folder
        atomic_write(out / "fedsync.json", json.dumps(metadata, indent=2).encode())
        return metadata
    atomic_write(out, state_bytes(found.state, metadata))
    return metadata
