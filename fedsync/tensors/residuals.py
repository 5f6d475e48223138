"""Error feedback for compressed updates: what a lossy encoding left out of one update is added to the worker's
next, so nothing a worker learned is lost for good, only delayed (fedsync/tensors/encoding.py).

The residual lives on the worker's own disk beside its key, never in the share: it is private to the worker and
changes every round. Each update leaves one file, `RUN-WORKER-rNNNNNN.safetensors` (the residual after round N's
update), written whole before the update itself. An update for round r starts from the newest file of an earlier
round, so a worker restarted after a crash continues exactly: redoing round r (its update never got out) it starts
again from the same residual, whether or not round r's file was written. The two newest files are kept; the
process keeps the last residual in memory, so a round reads nothing back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from fedsync.base.logs import Log
from fedsync.storage.keys import key_dir
from fedsync.storage.local import atomic_write
from fedsync.tensors.encoding import NONE, encode, residual
from fedsync.tensors.files import state_bytes

Tensors = dict[str, torch.Tensor]


def residual_dir() -> Path:
    """Beside this machine's keys ($FEDSYNC_KEY_DIR, else ~/.config/fedsync/keys): residuals/."""
    return key_dir() / "residuals"


class ErrorFeedback:
    def __init__(self, folder: Path, run_id: str, worker: str, log: Log) -> None:
        self.folder, self.prefix, self.log = folder, f"{run_id}-{worker}-r", log
        self.pattern = re.compile(re.escape(self.prefix) + r"(\d{6})\.safetensors$")
        self.memory: tuple[int, Tensors] | None = None  # (round, residual) this process wrote last

    def path(self, r: int) -> Path:
        return self.folder / f"{self.prefix}{r:06d}.safetensors"

    def _rounds(self) -> list[int]:
        """The rounds whose residual files exist, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := self.pattern.match(p.name)))

    def carried(self, r: int) -> tuple[int | None, Tensors]:
        """The round and residual an update for round r starts from: the newest of an earlier round (none: zero).
        A file that cannot be read is said and skipped: that residual is lost, nothing else."""
        if self.memory is not None and self.memory[0] < r:
            return self.memory
        for p in reversed([k for k in self._rounds() if k < r]):
            try:
                return p, st_load(self.path(p).read_bytes())
            except Exception as e:  # noqa: BLE001 - a damaged local file of any kind: said, not fatal
                self.log(f"WARNING: the error-feedback residual {self.path(p)} cannot be used ({e}); skipped")
        return None, {}

    def encode(self, r: int, update: Mapping[str, torch.Tensor], encoding: str) -> Tensors:
        """The tensors to write for round r's update: the update plus the carried residual, encoded; the residual it
        leaves is saved first, and files older than the one it started from are removed."""
        started_from, start = self.carried(r)
        meant = {k: (v + start[k].to(v.dtype)) if k in start and v.is_floating_point() else v
                 for k, v in update.items()}
        written = encode(meant, encoding)
        left = residual(meant, written, encoding)
        atomic_write(self.path(r), state_bytes(left))
        self.memory = (r, left)
        for old in self._rounds():
            if started_from is not None and old < started_from:
                self.path(old).unlink(missing_ok=True)
        return written


def encoded_update(r: int, update: Mapping[str, torch.Tensor], encoding: str,
                   feedback: ErrorFeedback | None) -> Mapping[str, torch.Tensor]:
    """The tensors a worker writes for round r's update in `encoding`: the update itself for none; with `feedback`
    (error_feedback: true), the update plus what earlier ones lost, the new residual saved first."""
    if encoding == NONE:
        return update
    if feedback is None:
        return encode(update, encoding)
    return feedback.encode(r, update, encoding)
