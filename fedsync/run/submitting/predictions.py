"""A finished job's predictions written to the user's own files, outside the share: a CSV with one line per input
(its index, its id, the predicted class and that class's probability, or why it could not be predicted) and, beside
it, a safetensors file with the full logits; for prompts, a JSON lines file with each prompt's continuation. They
are written chunk by chunk, in the inputs' order, to temporary files renamed into place at the end: a job larger
than memory is merged in constant memory, and an interrupted merge leaves no half file under the final names."""

from __future__ import annotations

import csv
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsync.learning.generate import Continued
from fedsync.run.submitting.jobs import probabilities


@dataclass(frozen=True)
class Written:
    rows: int
    failed: int     # inputs that could not be predicted
    out: Path
    beside: Path | None = None  # the logits beside the CSV; None for continuations


def logits_path(out: Path) -> Path:
    """The safetensors file beside the CSV: preds.csv -> preds.safetensors."""
    return out.with_suffix(".safetensors")


def write_predictions(out: Path, rows: int, classes: int, metadata: dict[str, str],
                      chunks: Iterable[tuple[list[str], torch.Tensor, dict[int, str]]]) -> Written:
    """`chunks` yields, in order, each chunk's ids, its logits (rows x classes; NaN where it failed) and its failed
    rows' reasons by row within the chunk."""
    beside = logits_path(out)
    tmp_csv, tmp_logits = out.with_name(f".{out.name}.tmp"), beside.with_name(f".{beside.name}.tmp")
    header = json.dumps({"__metadata__": metadata,
                         "logits": {"dtype": "F32", "shape": [rows, classes], "data_offsets": [0, rows * classes * 4]}})
    header += " " * (-len(header) % 8)  # the data section starts 8-aligned
    try:
        written, failed = _write(tmp_csv, tmp_logits, header, rows, chunks)
    except BaseException:
        for tmp in (tmp_csv, tmp_logits):  # an interrupted merge leaves nothing behind
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp_logits, beside)
    os.replace(tmp_csv, out)
    return Written(rows, failed, out, beside)


def _write(tmp_csv: Path, tmp_logits: Path, header: str, rows: int,
           chunks: Iterable[tuple[list[str], torch.Tensor, dict[int, str]]]) -> tuple[int, int]:
    written = failed = 0
    with open(tmp_csv, "w", newline="") as text, open(tmp_logits, "wb") as tensors:
        table = csv.writer(text)
        table.writerow(["index", "id", "class", "probability", "problem"])
        tensors.write(struct.pack("<Q", len(header)) + header.encode())
        for ids, logits, problems in chunks:
            cls, prob = probabilities(logits)
            for i, (name, c, p) in enumerate(zip(ids, cls, prob)):
                problem = problems.get(i, "")
                failed += bool(problem or c < 0)
                table.writerow([written + i, name, "" if c < 0 else c, "" if c < 0 else f"{p:.6f}",
                                problem or ("" if c >= 0 else "not predicted")])
            tensors.write(logits.contiguous().numpy().tobytes())
            written += len(ids)
        if written != rows:
            raise ValueError(f"merged {written} inputs, the job has {rows}")
        for f in (text, tensors):
            f.flush()
            os.fsync(f.fileno())
    return written, failed


def write_generations(out: Path, rows: int,
                      chunks: Iterable[tuple[list[str], list[Continued] | None, dict[int, str]]]) -> Written:
    """`chunks` yields, in order, each chunk's ids, its continuations (None when the chunk failed whole) and its
    failed rows' reasons by row within the chunk. One JSON object per prompt: index, id, generation, tokens (how
    many it generated), prompt_tokens_dropped (cut from the prompt's start to fit max_length), problem."""
    tmp = out.with_name(f".{out.name}.tmp")
    written = failed = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for ids, texts, problems in chunks:
                for i, name in enumerate(ids):
                    problem = problems.get(i) or (None if texts is not None else "not continued")
                    failed += problem is not None
                    made = texts[i] if texts is not None and problem is None else None
                    f.write(json.dumps({"index": written + i, "id": name,
                                        "generation": made.text if made else None,
                                        "tokens": made.tokens if made else 0,
                                        "prompt_tokens_dropped": made.dropped if made else 0,
                                        "problem": problem}, ensure_ascii=False) + "\n")
                written += len(ids)
            if written != rows:
                raise ValueError(f"merged {written} prompts, the job has {rows}")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return Written(rows, failed, out)
