"""The coordinator's evaluation, off the critical path: each closed round's model is evaluated in a thread of its
own on the coordinator's device while the next round already collects updates, and its metrics land in
<round>/evaluation.yaml and metrics.csv when done. A crash mid-evaluation loses nothing: the next start evaluates
every due round that has no evaluation.yaml (docs/PROTOCOL.md section 6, step 6)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from fedsync.base.faults import crash_point
from fedsync.base.logs import Log
from fedsync.learning.data import Source, first
from fedsync.learning.tasks import Task
from fedsync.learning.train import evaluate
from fedsync.run.background import yield_cpu
from fedsync.run.config import RunConfig, test_examples
from fedsync.storage.markers import FORMAT_VERSION, Evaluation, FileRef, HeldOut, to_dict
from fedsync.storage.share import Share
from fedsync.storage.trouble import Backoff
from fedsync.tensors.files import load_verified

Job = tuple[int, FileRef, "dict[str, torch.Tensor] | None"]


def federated_mean(evaluations: list[HeldOut]) -> HeldOut | None:
    """The workers' evaluations of one model as one: loss and accuracy weighted by their held-out counts."""
    total = sum(e.samples for e in evaluations)
    if not total:
        return None
    return HeldOut(loss=sum(e.loss * e.samples for e in evaluations) / total,  # type: ignore[arg-type]
                   accuracy=min(1.0, sum(e.accuracy * e.samples for e in evaluations) / total), samples=total)


PROBE_EXAMPLES = 256  # held-out examples a round's aggregate is tried on before it is written


class Probe:
    """The test loss of a round's aggregate on the first PROBE_EXAMPLES held-out examples, on the CPU in the
    collecting thread, before the round closes: a model whose loss is not finite is redone without the update that
    made it so (docs/PROTOCOL.md section 6, step 5), not found out beside the next round."""

    def __init__(self, task: Task, cfg: RunConfig, test: Source) -> None:
        self.model = task.build_model(cfg.model)
        self.examples = first(test_examples(test, cfg), PROBE_EXAMPLES)
        self.batch_size = cfg.eval_batch_size

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        with torch.no_grad():
            return evaluate(self.model, self.examples, self.batch_size)[0]


def due(r: int, rounds: int, every: int) -> bool:
    """Rounds whose model is evaluated: every `every`-th, and always the last."""
    return r % every == 0 or r == rounds


class Evaluator:
    """One thread that evaluates submitted rounds in order; `landed` is called (in that thread) with each result,
    after its evaluation.yaml is written."""

    def __init__(self, share: Share, task: Task, cfg: RunConfig, test: Source, device: str, log: Log,
                 landed: Callable[[Evaluation], None]) -> None:
        self.share, self.task, self.cfg, self.device, self.log, self.landed = share, task, cfg, device, log, landed
        self.test = test_examples(test, cfg)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.results: dict[int, Evaluation] = {}
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self.backoff = Backoff(log)
        self.model: torch.nn.Module | None = None  # built once in the thread (a language model loads its base once)
        self.thread = threading.Thread(target=self._work, name="evaluation", daemon=True)
        self.thread.start()

    def submit(self, r: int, model: FileRef, state: dict[str, torch.Tensor] | None = None) -> None:
        """Evaluate round r's model: `state` if given (just aggregated), else read from the share and verified."""
        self.jobs.put((r, model, state))

    def check(self) -> None:
        """Raise, in the caller's thread, what made the evaluation thread fail."""
        if self.error is not None:
            raise self.error

    def wait(self, r: int) -> Evaluation:
        """Round r's evaluation: read back when an earlier start wrote it, else waited for."""
        with self.changed:
            while r not in self.results:
                if self.share.exists(self.share.evaluation(r)):
                    return self.share.read_record(Evaluation, self.share.evaluation(r))
                self.check()
                self.changed.wait(1.0)
        return self.results[r]

    def close(self) -> None:
        """Stop after the evaluation under way; rounds still queued are evaluated at the next start."""
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _work(self) -> None:
        yield_cpu("the evaluation thread", self.log)
        try:
            while (job := self.jobs.get()) is not None:
                result = self._evaluate(*job)
                self.landed(result)
                with self.changed:
                    self.results[result.round] = result
                    self.changed.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator's thread by check() and wait()
            with self.changed:
                self.error = e
                self.changed.notify_all()

    def _evaluate(self, r: int, ref: FileRef, state: dict[str, torch.Tensor] | None) -> Evaluation:
        started = time.perf_counter()
        if state is None:
            state = self.backoff.run(lambda: load_verified(self.share, ref.file, ref), f"reading round {r}'s model")
        if self.model is None:
            self.model = self.task.build_model(self.cfg.model)
        self.model.load_state_dict(state)  # the whole state: nothing of the last round's model stays
        crash_point(f"coordinator:evaluating:{r}")
        loss, accuracy = evaluate(self.model, self.test, self.cfg.eval_batch_size, self.device)
        result = Evaluation(format=FORMAT_VERSION, round=r, model=ref.blake3, test_accuracy=accuracy, test_loss=loss,
                            samples=len(self.test), seconds=round(time.perf_counter() - started, 3), device=self.device)
        self.backoff.run(lambda: self.share.write_yaml(self.share.evaluation(r), to_dict(result)),
                         f"writing round {r}'s evaluation")
        return result
