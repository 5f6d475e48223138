"""A worker's side of inference jobs (docs/PROTOCOL.md section 5.14): find the next chunk the plan gives it, run
the job's model over it in batches sized for its device, and write the logits, then the signed marker, last.

Inputs it cannot predict are named in the marker with their reason (an unreadable image, NaN or infinite values)
and get NaN logits; a chunk that does not fit the model at all (another shape) gets a marker with an `error` and no
tensors. Neither stops the worker or the job.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedsync.base.logs import Log
from fedsync.learning.generate import Continued, continue_prompts
from fedsync.learning.imagefolder import decode
from fedsync.learning.inputs import joined, split
from fedsync.learning.predict import batch_size_for, finite_rows, predict
from fedsync.learning.tasks import Task
from fedsync.learning.text import prompt_ids, prompt_record
from fedsync.storage import names
from fedsync.storage.jobfiles import list_jobs, read_job, read_plan
from fedsync.storage.keys import Identity
from fedsync.storage.markers import FORMAT_VERSION, FailedRow, JobMarker, OutputMarker, TaskRecord, to_dict
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import output_message, verify
from fedsync.tensors.files import load_verified, save_state


@dataclass(frozen=True)
class Device:
    """Where and how this worker runs models: as it trains (fedsync/worker.py)."""

    name: str
    precision: str
    channels_last: bool
    batch_size: int  # the run's eval_batch_size: the batch on a CPU, the least on a GPU


class Server:
    def __init__(self, share: Share, worker: str, identity: Identity, task: Task, record: TaskRecord, run_id: str,
                 model: nn.Module, device: Device, log: Log, state: Callable[..., None]) -> None:
        self.share, self.worker, self.identity, self.task, self.record = share, worker, identity, task, record
        self.run_id, self.device, self.log, self.state = run_id, device, log, state
        self.jobs: dict[str, JobMarker] = {}     # job.yaml is written once: read once
        self.model = model  # the worker's own (one copy of a large base): each chunk loads its job's weights into it,
        # as each training round loads the round's
        self.weights: tuple[str, dict[str, torch.Tensor]] | None = None  # the last job model's hash and tensors
        self.said: set[tuple[str, int | None, str]] = set()  # (job, chunk, why) said once
        self.rate: float | None = None  # inputs per second over recent chunks, for routing
        self.refused: set[str] = set()  # jobs of another run or task, or whose model does not load: never served

    def sweep(self) -> None:
        """Delete the temporaries a killed serving of this worker's left in any job's outputs (an owner deletes its
        temporaries when it starts: PROTOCOL section 6); called before this process writes an output."""
        for job in list_jobs(self.share):
            try:
                chunks = len(read_job(self.share, job).chunks)
            except Exception:  # noqa: BLE001 - not written whole (nor served) yet
                continue
            self.share.remove_temporaries(names.outputs_dir(job), {
                names.output_stem(c, self.worker) + suffix for c in range(chunks)
                for suffix in (names.TENSORS_SUFFIX, names.MARKER_SUFFIX)})

    def serve(self) -> bool:
        """Run the first chunk of a running job that the plan gives this worker, that it has not run yet and whose
        files are whole; False when there is none (the worker is idle again). A chunk still syncing, or a job this
        worker refuses, never holds up the others."""
        for job, chunk in self._candidates():
            if self.run(job, chunk):
                return True
        self.state(state="idle")
        return False

    def _candidates(self) -> Iterator[tuple[JobMarker, int]]:
        """The chunks the running jobs' plans give this worker and it has not run yet, in order."""
        for job in list_jobs(self.share):
            plan = read_plan(self.share, job)
            if plan is None or plan.state != "running" or not plan.queues.get(self.worker):
                continue
            marker = self._job(job)
            if marker is None:
                continue
            for chunk in plan.queues[self.worker]:
                if job in self.refused:
                    break  # its model does not load: none of its chunks is run
                if 0 <= chunk < len(marker.chunks) and not self._ran(marker, chunk):
                    yield marker, chunk

    def run(self, job: JobMarker, chunk: int) -> bool:
        """Run one chunk and write its output; False when its files have not arrived whole yet (tried again at the
        next look)."""
        ref = job.chunks[chunk]
        try:
            model = self._model(job)
        except Unusable as e:
            if e.reason.syncing:
                self._once(job.job, None, f"its model is not usable yet ({e.detail}); waiting")
                return False
            return self._refuse(job, f"{e.reason.value}: {e.detail}")
        except Exception as e:  # noqa: BLE001 - not this task's model (a forged or foreign job): never served
            return self._refuse(job, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        unreadable = None
        try:
            tensors = load_verified(self.share, names.join(names.job_dir(job.job), ref.file), ref)
        except Unusable as e:
            if e.reason.syncing:
                self._once(job.job, chunk, f"chunk {chunk}: its file is not usable yet ({e.detail}); waiting")
                return False
            tensors, unreadable = {}, e.detail  # whole as job.yaml says, yet not safetensors: an error output
        self.state(state="serving")
        started = time.perf_counter()
        if unreadable is not None:
            made, failed, error = None, [], f"wrong_inputs: {unreadable}"
        elif job.inputs == "prompts":
            made, failed, error = self._continue(model, job, chunk, tensors, ref.rows)
        else:
            made, failed, error = self._predict(model, tensors, ref.rows)
        outputs = None if made is None else \
            save_state(self.share.write, names.output_tensors(job.job, chunk, self.worker), made)
        seconds = time.perf_counter() - started
        marker = OutputMarker(format=FORMAT_VERSION, job=job.job, chunk=chunk, worker=self.worker, inputs=ref.blake3,
                              model=job.model.blake3, outputs=outputs, rows=ref.rows, failed=failed, error=error,
                              seconds=round(seconds, 4), device=self.device.name)
        marker.signature = self.identity.sign(output_message(marker))
        self.share.write_yaml(names.output_marker(job.job, chunk, self.worker), to_dict(marker))  # last
        rate = ref.rows / seconds if seconds > 0 else 0.0
        if error is None and rate > 0:  # smoothed: one small chunk's time is noisy
            self.rate = rate if self.rate is None else (self.rate + rate) / 2
        if self.rate:
            self.state(infer_samples_per_s=round(self.rate, 1))
        problem = f"; {len(failed)} input(s) not predicted ({failed[0].reason}{' …' if len(failed) > 1 else ''})" \
            if failed else ""
        self.log(f"job {job.job}: chunk {chunk} ({ref.rows} inputs) " + (f"refused: {error}" if error else
                 f"predicted in {seconds:.2f} s, {rate:.0f} inputs/s{problem}"))
        return True

    def _refuse(self, job: JobMarker, why: str) -> bool:
        self.refused.add(job.job)
        self._once(job.job, None, f"not serving it: its model does not load into {job.model_name} ({why})")
        return False

    def _job(self, job: str) -> JobMarker | None:
        if job in self.refused:
            return None
        if job not in self.jobs:
            try:
                marker = read_job(self.share, job)
            except Exception:  # noqa: BLE001 - not written whole yet
                return None
            if marker.run_id != self.run_id or marker.task != self.record:
                self.refused.add(job)
                self._once(job, None, f"not serving it: its model is for {marker.task.name} (layout "
                                      f"{marker.task.layout[:12]}) of run {marker.run_id}; this worker has "
                                      f"{self.record.name} (layout {self.record.layout[:12]}) of run {self.run_id}")
                return None
            self.jobs[job] = marker
        return self.jobs[job]

    def _ran(self, job: JobMarker, chunk: int) -> bool:
        """Whether this worker's own output for the chunk is there whole; one under its name that it did not sign,
        or whose tensors changed since, is replaced by running the chunk again."""
        try:
            m = self.share.read_record(OutputMarker, names.output_marker(job.job, chunk, self.worker))
            if m.outputs is not None:
                self.share.read_verified(names.join(names.outputs_dir(job.job), m.outputs.file), m.outputs)
        except Exception:  # noqa: BLE001 - absent, unreadable or changed: not (or no longer) what this worker wrote
            return False
        return verify(self.identity.public, output_message(m), m.signature) and m.inputs == job.chunks[chunk].blake3

    def _model(self, job: JobMarker) -> nn.Module:
        if self.weights is None or self.weights[0] != job.model.blake3:
            self.weights = None
            state = load_verified(self.share, names.job_model(job.job), job.model)
            self.model.load_state_dict(state)  # raises for weights of another model: the job is refused
            self.weights = (job.model.blake3, state)
        else:
            self.model.load_state_dict(self.weights[1])
        return self.model

    def _predict(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                 rows: int) -> tuple[dict[str, torch.Tensor] | None, list[FailedRow], str | None]:
        """A chunk of tensors or images: the model's logits for each row."""
        x, failed, error = self._inputs(tensors, rows)
        if error is not None:
            return None, failed, error
        logits = predict(model, x, batch_size_for(self.device.name, x[0].nelement() * 4, self.device.batch_size),
                         self.device.name, self.device.precision, self.device.channels_last)
        return {"logits": logits}, failed, None

    def _continue(self, model: nn.Module, job: JobMarker, chunk: int, tensors: dict[str, torch.Tensor],
                  rows: int) -> tuple[dict[str, torch.Tensor] | None, list[FailedRow], str | None]:
        """A chunk of prompts: each one's continuation (empty, with its reason, for a prompt that is not one)."""
        lines = split(tensors["bytes"], tensors["offsets"], rows) if set(tensors) == {"bytes", "offsets"} else None
        if self.task.tokenizer is None or job.generation is None or lines is None:
            return None, [], "wrong_inputs: not prompts this task's model can continue (bytes and offsets of " \
                             f"{rows} JSON lines)"
        tokenizer = self.task.tokenizer()
        prompts: dict[int, list[int]] = {}
        failed = []
        for i, line in enumerate(lines):
            try:
                ids = prompt_ids(prompt_record(line), tokenizer)
                if not ids:
                    raise ValueError("it holds no token")
                prompts[i] = ids
            except ValueError as e:
                failed.append(FailedRow(row=i, reason=f"bad_prompt: {e}"))
        made = continue_prompts(model, tokenizer, list(prompts.values()), job.generation, self.task.input_shape[0],
                                self.device.name, self.device.precision, self.device.batch_size,
                                job.generation.seed + chunk)
        texts = dict(zip(prompts, made))
        blank = Continued("", 0, 0)
        row = [texts.get(i, blank) for i in range(rows)]
        return {**joined([t.text.encode() for t in row]), "tokens": torch.tensor([t.tokens for t in row]),
                "dropped": torch.tensor([t.dropped for t in row])}, failed, None

    def _inputs(self, tensors: dict[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, list[FailedRow], str | None]:
        """The chunk as the model's inputs, the rows that cannot be predicted, or why none can."""
        shape = tuple(self.task.input_shape)
        if "x" in tensors:
            x = tensors["x"]
            if x.dtype != torch.float32 or tuple(x.shape) != (rows, *shape):
                return x, [], f"wrong_shape: x is {x.dtype} {list(x.shape)}; the model takes float32 [{rows}, " \
                              + ", ".join(map(str, shape)) + "]"
            bad = (~finite_rows(x)).nonzero().flatten().tolist()
            return x, [FailedRow(row=i, reason="non_finite: NaN or infinite values") for i in bad], None
        if "bytes" in tensors and "offsets" in tensors and self.task.scale_images is not None and len(shape) == 3:
            return self._images(tensors["bytes"], tensors["offsets"], rows, shape)
        return torch.empty(0), [], f"wrong_inputs: the chunk holds {', '.join(sorted(tensors))}; this task " \
            "takes x" + \
            (" or images (bytes, offsets)" if self.task.scale_images is not None else "")

    def _images(self, data: torch.Tensor, offsets: torch.Tensor, rows: int,
                shape: tuple[int, ...]) -> tuple[torch.Tensor, list[FailedRow], str | None]:
        files = split(data, offsets, rows)
        if files is None:
            return torch.empty(0), [], "wrong_inputs: offsets do not cut bytes into the chunk's images"
        channels, size = shape[0], shape[1]
        pixels = torch.zeros(rows, *shape, dtype=torch.uint8)
        failed = []
        for i, raw in enumerate(files):
            try:
                pixels[i] = decode(io.BytesIO(raw), size, channels)
            except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a damaged or foreign file
                failed.append(FailedRow(row=i, reason=f"unreadable_image: {type(e).__name__}: {e}"))
        x = self.task.scale_images(pixels)  # type: ignore[misc]
        if failed:
            x[[f.row for f in failed]] = float("nan")  # predicted as nothing: NaN logits
        return x, failed, None

    def _once(self, job: str, chunk: int | None, message: str) -> None:
        if (job, chunk, message) not in self.said:
            self.said.add((job, chunk, message))
            self.log(f"job {job}: {message}")
