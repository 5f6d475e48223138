"""Inference jobs in the share (docs/PROTOCOL.md section 5.14): a job's folder written by the process that submits
it, and the checks every reader makes of its files. The submitting loop is fedsync/infer.py, a worker's side
fedsync/run/working/serve.py.

Chunks, the model and job.yaml are written once; plan.yaml is the submitter's status file, rewritten whole. An
output counts only when its marker is signed by the key of the worker it names and its tensors have the named
hash and the chunk's shape; the first such output for a chunk is taken and any later one reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

from fedsync.base.clock import utc_stamp
from fedsync.learning.generate import Continued
from fedsync.learning.inputs import Inputs, cut, split
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.markers import (
    FORMAT_VERSION,
    ChunkRef,
    FileRef,
    Generation,
    JobMarker,
    OutputMarker,
    TaskRecord,
    to_dict,
)
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import output_message, verify
from fedsync.tensors.files import save_state

# Reasons an output is not taken that mean its bytes may not have arrived yet: not reported (every output is judged
# again whenever its files change, so one that arrives whole later is taken then).
SYNCING = {"marker_unreadable", "missing_file", "size_mismatch", "hash_mismatch", "io_error"}
MAX_CHUNKS = 6_000  # job.yaml lists every chunk (about 135 bytes each) and stays under the 1 MiB YAML bound


class OutputRefused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def default_chunk_rows(rows: int, example_bytes: int) -> int:
    """Chunks of about 4 MiB of inputs (at least 32 of them when there are enough inputs, so that two or more
    workers share the end of a job evenly), between 256 and 65,536 inputs, and few enough for job.yaml."""
    by_size = max(256, min(65_536, (4 << 20) // max(example_bytes, 1)))
    spread = max(256, -(-rows // 32))
    return max(min(by_size, spread), -(-rows // MAX_CHUNKS))


def prompt_chunk_rows(rows: int) -> int:
    """Chunks of 32 prompts (a language model takes seconds for each batch of them), fewer when the job is small
    enough that 8 chunks still spread it over the workers, and few enough for job.yaml."""
    return max(min(32, -(-rows // 8)), -(-rows // MAX_CHUNKS))


def write_job(share: Share, job: str, run_id: str, task: TaskRecord, model_name: str, model: bytes,
              model_source: str, inputs: Inputs, source: str, chunk_rows: int,
              progress: Callable[[int, int], None], generation: Generation | None = None) -> JobMarker:
    """Write a job's files: the model, each chunk of the inputs as it is read (never all of them in memory), then
    job.yaml, last. Rewriting after a crash is safe: nothing counts before job.yaml exists."""
    share.make_folder(names.job_dir(job))
    share.write(names.job_model(job), model)
    model_ref = FileRef(file=names.JOB_MODEL, blake3=hash_bytes(model), bytes=len(model))
    chunks = []
    spans = list(cut(inputs, chunk_rows))
    for i, (start, stop) in enumerate(spans):
        name = names.chunk_name(i)
        ref = save_state(share.write, names.join(names.job_dir(job), name), inputs.chunk(start, stop), ref_name=name)
        chunks.append(ChunkRef(file=ref.file, blake3=ref.blake3, bytes=ref.bytes, rows=stop - start))
        progress(i + 1, len(spans))
    marker = JobMarker(format=FORMAT_VERSION, job=job, run_id=run_id, task=task, model_name=model_name,
                       model=model_ref, model_source=model_source, inputs=inputs.kind, source=source,
                       rows=inputs.rows, chunk_rows=chunk_rows, chunks=chunks, created_at=utc_stamp(),
                       generation=generation)
    share.write_yaml(names.job_marker(job), to_dict(marker))  # last: the job exists from here
    return marker


@dataclass(frozen=True)
class Output:
    """A checked output: its marker and its logits (rows x classes; NaN for the rows it could not predict), or for
    prompts its continuations (empty for the rows it could not continue); neither when the chunk failed whole."""

    marker: OutputMarker
    logits: torch.Tensor | None
    texts: list[Continued] | None = None


def check_output(share: Share, job: JobMarker, chunk: int, worker: str, keys: Mapping[str, str],
                 classes: int) -> Output:
    """The output of `worker` for `chunk`, or OutputRefused with the reason: its marker must name this job, chunk,
    worker, inputs and model, be signed by the worker's key (`keys`), and its tensors must have the named hash and
    be one float32 `logits` tensor of rows x classes, finite except in the rows it says failed, or for prompts the
    rows' texts (UTF-8) and counts."""
    where = names.output_marker(job.job, chunk, worker)
    try:
        m = share.read_record(OutputMarker, where)
    except OSError as e:
        raise OutputRefused("io_error", str(e)) from None
    except Exception as e:  # noqa: BLE001 - not valid YAML, or not the schema: maybe not synced whole yet
        raise OutputRefused("marker_unreadable", str(e)) from None
    if chunk >= len(job.chunks):
        raise OutputRefused("wrong_chunk", f"the job has {len(job.chunks)} chunks, not a chunk {chunk}")
    expected = {"job": job.job, "chunk": chunk, "worker": worker, "inputs": job.chunks[chunk].blake3,
                "model": job.model.blake3, "rows": job.chunks[chunk].rows}
    for field, value in expected.items():
        if getattr(m, field) != value:
            raise OutputRefused("wrong_" + field if field != "rows" else "wrong_shape",
                                f"{field} is {getattr(m, field)!r}, expected {value!r}")
    key = keys.get(worker)
    if key is None:
        raise OutputRefused("unknown_worker", f"no key is known for worker {worker} (trust.yaml or its registration)")
    if not verify(key, output_message(m), m.signature):
        raise OutputRefused("bad_signature", f"not signed by {worker}'s key")
    if any(not 0 <= f.row < m.rows for f in m.failed):
        raise OutputRefused("wrong_shape", "a failed row lies outside the chunk")
    if m.outputs is None:
        if m.error is None:
            raise OutputRefused("marker_invalid", "names no outputs and no error")
        return Output(m, None)
    if m.outputs.file != names.output_stem(chunk, worker) + names.TENSORS_SUFFIX:
        raise OutputRefused("bad_path", f"outputs.file {m.outputs.file!r} is not its own")
    try:
        data = share.read_verified(names.join(names.outputs_dir(job.job), m.outputs.file), m.outputs)
    except Unusable as e:
        raise OutputRefused(e.reason.value, e.detail) from None
    except OSError as e:
        raise OutputRefused("io_error", str(e)) from None
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - the library reports malformed files with several exception types
        raise OutputRefused("not_safetensors", str(e)) from None
    if job.inputs == "prompts":
        return Output(m, None, read_texts(tensors, m.rows))
    logits = tensors.get("logits")
    if set(tensors) != {"logits"} or logits is None:
        raise OutputRefused("wrong_tensors", f"holds {', '.join(sorted(tensors))}; expected logits only")
    if logits.dtype != torch.float32 or tuple(logits.shape) != (m.rows, classes):
        raise OutputRefused("wrong_shape", f"logits {logits.dtype} {list(logits.shape)}, expected float32 "
                                           f"[{m.rows}, {classes}]")
    ok = torch.ones(m.rows, dtype=torch.bool)
    ok[[f.row for f in m.failed]] = False
    if not bool(torch.isfinite(logits[ok]).all()):
        raise OutputRefused("non_finite", "NaN or infinite logits in rows it does not say failed")
    return Output(m, logits)


TEXT_TENSORS = ("bytes", "offsets", "tokens", "dropped")


def read_texts(tensors: dict[str, torch.Tensor], rows: int) -> list[Continued]:
    """An output's continuations: UTF-8 texts cut by offsets, and each row's generated and dropped token counts."""
    if set(tensors) != set(TEXT_TENSORS):
        raise OutputRefused("wrong_tensors", f"holds {', '.join(sorted(tensors))}; expected "
                                             f"{', '.join(TEXT_TENSORS)}")
    pieces = split(tensors["bytes"], tensors["offsets"], rows)
    counts = [tensors[k] for k in ("tokens", "dropped")]
    if pieces is None or any(c.dtype != torch.int64 or tuple(c.shape) != (rows,) or bool((c < 0).any())
                             for c in counts):
        raise OutputRefused("wrong_shape", f"bytes and offsets do not hold {rows} texts, or tokens and dropped are "
                                           f"not {rows} counts (I64, >= 0)")
    try:
        texts = [p.decode("utf-8") for p in pieces]
    except UnicodeDecodeError as e:
        raise OutputRefused("not_utf8", str(e)) from None
    return [Continued(t, n, d) for t, n, d in zip(texts, counts[0].tolist(), counts[1].tolist())]


def worker_keys(trusted: Mapping[str, str], registered: Mapping[str, str | None]) -> dict[str, str]:
    """The key each worker's outputs must be signed with: the one trust.yaml (signed by the coordinator) holds for
    it, else the one it registered with."""
    keys = {w: k for w, k in registered.items() if k}
    keys.update(trusted)
    return keys


def chunk_spans(job: JobMarker) -> list[tuple[int, int]]:
    """(first input, one past the last) of every chunk."""
    spans, start = [], 0
    for c in job.chunks:
        spans.append((start, start + c.rows))
        start += c.rows
    return spans


def probabilities(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Each row's predicted class and its softmax probability (rows of NaN logits: -1 and NaN)."""
    probs = torch.softmax(logits.double(), dim=1)
    best, cls = probs.max(dim=1)
    bad = ~torch.isfinite(logits).all(dim=1)
    cls[bad] = -1
    best[bad] = math.nan
    return cls.tolist(), best.tolist()
