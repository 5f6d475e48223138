"""`fedsync infer`: submit an inference job to the share and drive it to the end (docs/PROTOCOL.md section 5.14).

Read top to bottom: resolve the model and open the inputs; write the job (the model, the inputs cut into chunks,
job.yaml last), or find it there from an earlier start with the same arguments; then, until every chunk has a
taken output, look at the live serving workers and the outputs that arrived, route the chunks (fedsync/run/
routing.py) and rewrite plan.yaml; last, merge the outputs in the inputs' order into the user's files (for a task
that writes text, the prompts' continuations). This process
is the job's only writer of job.yaml, its chunks, its model and plan.yaml; killed at any point, it continues where
the share says when started again.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from filelock import Timeout
from safetensors.torch import load as st_load

from fedsync.base import defaults
from fedsync.base.clock import utc_stamp
from fedsync.base.errors import ConfigError, ShareError, TrustError
from fedsync.base.logs import Log, make_log
from fedsync.learning.inputs import Inputs, open_inputs
from fedsync.learning.tasks import Task
from fedsync.run.config import RunConfig, config_from_dict, on_this_machine
from fedsync.run.liveness import Liveness
from fedsync.run.start import check_task
from fedsync.run.submitting.jobs import (
    MAX_CHUNKS,
    SYNCING,
    Output,
    OutputRefused,
    check_output,
    chunk_spans,
    default_chunk_rows,
    prompt_chunk_rows,
    worker_keys,
    write_job,
)
from fedsync.run.submitting.predictions import Written, write_generations, write_predictions
from fedsync.run.submitting.routing import route
from fedsync.run.trained import round_model
from fedsync.run.trust import read_trust
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.jobfiles import read_job, read_plan
from fedsync.storage.locks import local_lock
from fedsync.storage.manifest import finished, read_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Generation,
    JobMarker,
    JobPlan,
    Manifest,
    OutputProblem,
    TaskRecord,
    to_dict,
)
from fedsync.storage.share import Share
from fedsync.storage.trouble import Backoff
from fedsync.storage.watch import ShareWatcher, changes_within
from fedsync.tensors.files import state_bytes

MAX_PROBLEMS = 100  # plan.yaml keeps the newest this many


@dataclass
class InferOptions:
    share: Share
    inputs: Path
    out: Path
    model: str = defaults.INFER_MODEL
    name: str | None = None       # None: the inputs' name and a hash of what the job is
    chunk_rows: int | None = None  # None: about 4 MiB of inputs per chunk (fedsync/run/submitting/jobs.py)
    watch: str = defaults.WATCH
    rescan: float = defaults.INFER_RESCAN_S
    log: Log | None = None
    generation: Generation | None = None  # how prompts are continued (causal_lm); None: the defaults
    base_model: str | None = None  # causal_lm: this machine's copy of the base model's folder


def run_infer(opts: InferOptions) -> Written:
    share = opts.share
    log = opts.log or make_log("infer")
    manifest = read_manifest(share)
    cfg = on_this_machine(config_from_dict(manifest.config, share.where(share.manifest)), opts.base_model)
    task = cfg.resolved_task()
    writes_text = task.tokenizer is not None
    if opts.generation is not None and not writes_text:
        raise ConfigError(f"--max-new-tokens, --temperature and --top-p continue prompts: task {cfg.task}'s model "
                          "answers with classes")
    generation = (opts.generation or Generation()) if writes_text else None
    if writes_text and opts.out.suffix != ".jsonl":
        raise ConfigError(f"--out {opts.out}: task {cfg.task} writes text; give a JSON lines file (.jsonl)")
    inputs = open_inputs(opts.inputs, task.input_shape, task.scale_images is not None, writes_text)
    record = check_task(manifest, cfg)  # this machine builds the run's model, or refuses before writing
    model, model_source = _model(share, manifest, cfg, task, opts.model)
    source = inputs.identity()
    model_hash = hash_bytes(model)
    chunk_rows = opts.chunk_rows or (prompt_chunk_rows(inputs.rows) if writes_text else
                                     default_chunk_rows(inputs.rows, 4 * math.prod(task.input_shape)))
    if -(-inputs.rows // chunk_rows) > MAX_CHUNKS:
        raise ConfigError(f"--chunk-rows {chunk_rows} cuts {inputs.rows} inputs into more than {MAX_CHUNKS} chunks, "
                          f"more than job.yaml may list: give at least {-(-inputs.rows // MAX_CHUNKS)}")
    name = opts.name or _default_name(opts.inputs, source, model_hash, chunk_rows, generation)
    lock = local_lock(share.identity, f"job-{name}")
    try:
        lock.acquire()
    except Timeout:
        raise ShareError(f"another `fedsync infer` on this machine drives job {name} in {share.where()}") from None
    try:
        with ShareWatcher(share, opts.watch, list_store=False) as watcher:
            job = _job(share, name, manifest, record, cfg.model, model, model_source, model_hash, inputs, source,
                       chunk_rows, opts.chunk_rows, generation, log)
            return Submitter(share, manifest, job, cfg, task, inputs, opts, watcher, log).drive()
    finally:
        lock.release()


def _default_name(inputs: Path, source: str, model: str, chunk_rows: int, generation: Generation | None) -> str:
    """The inputs' name and 8 hex digits of what the job is: the same arguments give the same job."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in inputs.stem)[:40].strip(".-_") or "job"
    how = "" if generation is None else f"/{to_dict(generation)}"
    return f"{stem}-{hash_bytes(f'{source}/{model}/{chunk_rows}{how}'.encode())[:8]}"


def _model(share: Share, manifest: Manifest, cfg: RunConfig, task: Task, spec: str) -> tuple[bytes, str]:
    """The model's safetensors bytes and what they are: the run's final model, a closed round's (both verified
    against the run's own records), or a file, which must load into the run's model."""
    if spec == "final":
        final = finished(share, manifest.run_id, manifest.coordinator_key)
        if final is None:
            raise ShareError(f"run {manifest.run_id} has not finished: give --model N for a closed round's model")
        return share.read_verified(share.final_model, final.model), f"final (round {final.round})"
    if spec.isdigit():
        found = round_model(share, int(spec))
        return state_bytes(found.state), f"round {found.round}"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--model {spec!r} is neither final, a round's number nor a model file")
    data = path.read_bytes()
    try:
        task.build_model(cfg.model).load_state_dict(st_load(data))
    except Exception as e:  # noqa: BLE001 - not safetensors, or not this run's model
        raise ConfigError(f"--model {spec}: not a {cfg.model} model of task {cfg.task}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    return data, f"file {path.name}"


def _job(share: Share, name: str, manifest: Manifest, record: TaskRecord, model_name: str, model: bytes,
         model_source: str, model_hash: str, inputs: Inputs, source: str, chunk_rows: int, asked_rows: int | None,
         generation: Generation | None, log: Log) -> JobMarker:
    """The job in the share: the one an earlier start wrote with the same arguments, or a new one."""
    if share.exists(names.job_marker(name)):
        job = read_job(share, name)
        differs = [what for what, same in (("run", job.run_id == manifest.run_id), ("inputs", job.source == source),
                                           ("model", job.model.blake3 == model_hash),
                                           ("chunk rows", asked_rows in (None, job.chunk_rows)),
                                           ("generation", job.generation == generation))
                   if not same]
        if differs:
            raise ConfigError(f"job {name} in {share.where()} was submitted with another {', '.join(differs)}: run "
                              "it with its own arguments to continue it, or give this one another --name")
        log(f"continuing job {name}: {job.rows} inputs in {len(job.chunks)} chunks, model {job.model_source}")
        return job
    log(f"submitting job {name}: {inputs.rows} {inputs.kind} inputs from {inputs.path} in chunks of {chunk_rows}, "
        f"model {model_source}")
    return Backoff(log).run(lambda: write_job(
        share, name, manifest.run_id, record, model_name, model, model_source, inputs, source, chunk_rows,
        _cutting(name, log), generation), f"writing job {name}")


def _cutting(name: str, log: Log) -> Callable[[int, int], None]:
    """Says how far cutting the inputs got, at most every 5 s (a large input takes minutes)."""
    said = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal said
        if done < total and time.monotonic() - said >= 5:
            said = time.monotonic()
            log(f"job {name}: {done}/{total} chunks of inputs written")

    return progress


class Submitter:
    """The job's loop: outputs in, plan out, until every chunk has a taken output."""

    def __init__(self, share: Share, manifest: Manifest, job: JobMarker, cfg: RunConfig, task: Task, inputs: Inputs,
                 opts: InferOptions, watcher: ShareWatcher, log: Log) -> None:
        self.share, self.manifest, self.job, self.cfg, self.task = share, manifest, job, cfg, task
        self.inputs, self.opts, self.watcher, self.log = inputs, opts, watcher, log
        self.liveness = Liveness(share, cfg.worker_timeout)
        self.backoff = Backoff(log)
        self.rows = [c.rows for c in job.chunks]
        self.judged: dict[tuple[int, str], object] = {}  # (chunk, worker) -> the files' signatures when judged
        self.written = 0.0  # when plan.yaml was last written, by this process's clock
        self.plan = self._take_plan()
        self.done = {c: w for w, cs in self.plan.accepted.items() for c in cs}
        self.said_waiting = False
        self.shown = (-1, 0.0)
        self.heads: dict[tuple[str, int], float] = {}  # (worker, the chunk at the head of its queue) -> since when

    def drive(self) -> Written:
        try:
            return self._drive()
        except KeyboardInterrupt:  # workers stop taking its chunks; what they wrote is kept for the next start
            self._write(state="stopped", queues={})
            raise

    def _drive(self) -> Written:
        while True:
            try:
                self.liveness.scan()
                self._collect()
                if len(self.done) == len(self.rows):
                    written = self._merge()
                    if written is not None:
                        self._write(state="done", queues={})
                        return written
                    continue  # a taken output changed since: its chunk runs again
                live = self._speeds([w for w in self.liveness.live() if self.liveness.info[w].serves])
                queues = route(self.rows, set(self.done), self.plan.queues, live)
                self._progress(live)
                if queues != self.plan.queues or time.monotonic() - self.written >= self.cfg.heartbeat:
                    self._write(queues=queues)
                self.backoff.reset()
            except OSError as e:
                self.watcher.wait(self.backoff.failed(e, f"driving job {self.job.job}"))
                continue
            self.watcher.wait(self.opts.rescan)

    def _take_plan(self) -> JobPlan:
        """plan.yaml as an earlier start left it (its queues and taken outputs carry on), after making sure no
        submitter on another machine still drives the job: one that rewrites the plan within worker_timeout is
        alive (the same watch as the coordinator's lease, PROTOCOL 5.2)."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        previous = read_plan(self.share, self.job.job)
        if previous is not None and previous.state == "running" and previous.host != socket.gethostname():
            where = names.job_plan(self.job.job)
            self.log(f"job {self.job.job} has a plan from {previous.owner}; watching it for "
                     f"{self.cfg.worker_timeout:.0f} s")
            if changes_within(self.share, where, self.share.signature(where), self.cfg.worker_timeout, 0.5):
                raise ShareError(f"job {self.job.job} is driven by `fedsync infer` on {previous.host} "
                                 f"({previous.owner}), which keeps its plan fresh: stop it first")
        plan = JobPlan(format=FORMAT_VERSION, job=self.job.job, owner=owner, host=socket.gethostname(), heartbeat=0,
                       state="running", queues={}, accepted={})
        if previous is not None:
            taken = {w: [c for c in cs if 0 <= c < len(self.job.chunks)] for w, cs in previous.accepted.items()}
            plan = replace(plan, heartbeat=previous.heartbeat, queues=previous.queues, accepted=taken,
                           problems=previous.problems)
        return plan

    def _taken(self) -> dict[str, list[int]]:
        """The chunks whose output was taken, by the worker it came from."""
        by: dict[str, list[int]] = {}
        for c, w in sorted(self.done.items()):
            by.setdefault(w, []).append(c)
        return by

    def _write(self, **changes: object) -> None:
        self.plan = replace(self.plan, heartbeat=self.plan.heartbeat + 1, written_at=utc_stamp(),
                            accepted=self._taken(), problems=self.plan.problems[-MAX_PROBLEMS:],
                            **changes)  # type: ignore[arg-type]
        self.share.write_yaml(names.job_plan(self.job.job), to_dict(self.plan))
        self.written = time.monotonic()

    def _speeds(self, live: list[str]) -> dict[str, float]:
        """Inputs per second each live worker predicts at: as it last said (else its training speed, else 1), but
        no more than its chunk in hand shows: a chunk held for t seconds caps the speed at its rows / t. A worker
        that heartbeats yet delivers nothing (stuck on a mount, refusing the job) so looks slower and slower, and
        at the end of the job the others take over what it holds (fedsync/run/submitting/routing.py)."""
        now, speeds, heads = time.monotonic(), {}, {}
        for w in live:
            info = self.liveness.info[w]
            speeds[w] = info.infer_samples_per_s or info.samples_per_s or 1.0
            queue = self.plan.queues.get(w)
            if queue:
                since = heads[(w, queue[0])] = self.heads.get((w, queue[0]), now)
                if now > since:
                    speeds[w] = min(speeds[w], self.rows[queue[0]] / (now - since))
        self.heads = heads
        return speeds

    def _keys(self) -> dict[str, str]:
        try:
            trusted = read_trust(self.share, self.manifest.run_id, self.manifest.coordinator_key)
        except TrustError as e:
            self.log(f"WARNING: {e}; checking outputs against the workers' registered keys only")
            trusted = {}
        return worker_keys({w: e.key for w, e in trusted.items()},
                           {w: i.public_key for w, i in self.liveness.info.items()})

    def _collect(self) -> None:
        """Judge each output whose files changed since it was last judged: the first verified one for a chunk is
        taken; a later one is reported as a duplicate, a bad one with its reason."""
        signatures: dict[tuple[int, str], list[object]] = {}
        for e in self.share.list(names.outputs_dir(self.job.job)):
            tensors = e.name.endswith(names.TENSORS_SUFFIX)
            owner = names.output_owner(e.name.removesuffix(names.TENSORS_SUFFIX) + names.MARKER_SUFFIX if tensors
                                       else e.name)
            if owner is not None:
                signatures.setdefault(owner, []).append((e.name, e.signature))
        keys: dict[str, str] | None = None
        for (chunk, worker), files in sorted(signatures.items()):
            signature = tuple(sorted(files))  # type: ignore[type-var]
            if self.judged.get((chunk, worker)) == signature or self.done.get(chunk) == worker:
                continue
            if not any(n.endswith(names.MARKER_SUFFIX) for n, _ in files):
                continue  # the tensors came first; the marker is still on its way
            keys = keys if keys is not None else self._keys()
            self.judged[(chunk, worker)] = signature
            try:
                output = check_output(self.share, self.job, chunk, worker, keys, self.task.num_classes)
            except OutputRefused as e:
                if e.reason not in SYNCING:
                    self._problem(chunk, worker, e.reason, e.detail)
                continue
            if chunk in self.done:
                self._problem(chunk, worker, "duplicate", f"chunk {chunk}'s output from {self.done[chunk]} came "
                                                          "first and was taken")
                continue
            self.done[chunk] = worker
            if output.marker.error is not None:
                self.log(f"job {self.job.job}: chunk {chunk} could not be predicted ({output.marker.error})")

    def _problem(self, chunk: int, worker: str, reason: str, detail: str) -> None:
        self.log(f"job {self.job.job}: output of {worker} for chunk {chunk} not taken: {reason} ({detail})")
        self.plan.problems.append(OutputProblem(chunk=chunk, worker=worker, reason=reason, detail=detail))

    def _progress(self, live: dict[str, float]) -> None:
        if not live and not self.said_waiting:
            self.said_waiting = True
            self.log(f"job {self.job.job}: waiting for a serving worker (`fedsync worker --share "
                     f"{self.share.where()} --serve`)")
        elif live:
            self.said_waiting = False
        count = len(self.done)
        if count == self.shown[0] or time.monotonic() - self.shown[1] < 1.0:
            return
        self.shown = (count, time.monotonic())
        done_rows = sum(self.rows[c] for c in self.done)
        taken = self._taken()
        by = {w: len(taken.get(w, [])) for w in sorted(set(taken) | set(live))}
        self.log(f"job {self.job.job}: {count}/{len(self.rows)} chunks ({done_rows}/{self.job.rows} inputs); chunks "
                 f"by worker: {', '.join(f'{w} {n}' for w, n in by.items()) or 'none yet'}")

    def _merge(self) -> Written | None:
        """Every taken output checked again as it is merged, in the inputs' order, into the user's files; None (no
        file written, and the chunk pending again) when one no longer checks out."""
        keys = self._keys()
        started = time.perf_counter()
        classes = self.task.num_classes
        at = [0]  # the chunk being merged: the one whose output no longer checks out, if one does not

        def outputs() -> Iterator[tuple[list[str], Output, dict[int, str]]]:
            for chunk, (start, stop) in enumerate(chunk_spans(self.job)):
                at[0] = chunk
                out = check_output(self.share, self.job, chunk, self.done[chunk], keys, classes)
                problems = {f.row: f.reason for f in out.marker.failed}
                if out.logits is None and out.texts is None:
                    problems = {i: out.marker.error or "" for i in range(stop - start)}
                yield self.inputs.ids_of(start, stop), out, problems

        def logits() -> Iterator[tuple[list[str], torch.Tensor, dict[int, str]]]:
            for ids, out, problems in outputs():
                yield ids, out.logits if out.logits is not None else torch.full((len(ids), classes), math.nan), \
                    problems

        metadata = {"fedsync.job": self.job.job, "fedsync.model": self.job.model.blake3,
                    "fedsync.model_source": self.job.model_source, "fedsync.run_id": self.job.run_id}
        try:
            written = write_generations(self.opts.out, self.job.rows, ((ids, out.texts, problems)
                                                                        for ids, out, problems in outputs())) \
                if self.job.inputs == "prompts" else \
                write_predictions(self.opts.out, self.job.rows, classes, metadata, logits())
        except OutputRefused as e:
            chunk = at[0]
            self.log(f"job {self.job.job}: the taken output of {self.done[chunk]} for chunk {chunk} changed since "
                     f"({e.reason}: {e.detail}); running the chunk again")
            del self.done[chunk]
            return None
        by = ", ".join(f"{w} {len(cs)}" for w, cs in sorted(self._taken().items()))
        files = written.out if written.beside is None else f"{written.out} and {written.beside}"
        self.log(f"job {self.job.job}: all {len(self.rows)} chunks done (by worker: {by}); wrote {files} in "
                 f"{time.perf_counter() - started:.2f} s")
        return written
