"""Error feedback for compressed updates: what a lossy encoding left out of one update is added to the worker's
next, so nothing a worker learned is lost for good, only delayed (fedsync/aggregation/encoding.py).

The residual lives on the worker's own disk beside its key, never in the share: it is private to the worker and
changes every round. One file per run and worker holds the residual the last update started from (`in`) and the
one it left (`out`), tagged with that update's round, written whole before the update itself. A worker restarted
after a crash therefore continues exactly: redoing round r (its update never got out) it starts again from `in`;
at a later round it takes `out`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from fedsync.aggregation.encoding import encode, residual
from fedsync.aggregation.tensors import state_bytes
from fedsync.base.logs import Log
from fedsync.storage.keys import key_dir
from fedsync.storage.local import atomic_write

Tensors = dict[str, torch.Tensor]


def residual_path(run_id: str, worker: str) -> Path:
    """Beside this machine's keys ($FEDSYNC_KEY_DIR, else ~/.config/fedsync/keys): residuals/RUN-WORKER.safetensors."""
    return key_dir() / "residuals" / f"{run_id}-{worker}.safetensors"


class ErrorFeedback:
    def __init__(self, path: Path, run_id: str, log: Log) -> None:
        self.path, self.run_id, self.log = path, run_id, log

    def carried(self, r: int) -> Tensors:
        """The residual an update for round r starts from (empty: none yet). A file that cannot be read is said and
        set aside: the update then starts from zero, which loses that residual but nothing else."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            tensors = st_load(data)
            meta = _metadata(data)
            kept = int(meta["round"])
            if meta.get("run") != self.run_id:
                raise ValueError(f"it belongs to run {meta.get('run')}")
        except Exception as e:  # noqa: BLE001 - a damaged local file of any kind: said, not fatal
            self.log(f"WARNING: the error-feedback residual {self.path} cannot be used ({e}); starting from zero")
            return {}
        part = "in/" if kept == r else "out/"  # kept == r: this round's update was cut short; it is redone
        return {k[len(part):]: v for k, v in tensors.items() if k.startswith(part)}

    def encode(self, r: int, update: Mapping[str, torch.Tensor], encoding: str) -> Tensors:
        """The tensors to write for round r's update: the update plus the carried residual, encoded; the residual it
        leaves is saved first."""
        start = self.carried(r)
        meant = {k: (v + start[k].to(v.dtype)) if k in start and v.is_floating_point() else v
                 for k, v in update.items()}
        written = encode(meant, encoding)
        left = residual(meant, written, encoding)
        state = {**{f"in/{k}": v for k, v in start.items()}, **{f"out/{k}": v for k, v in left.items()}}
        atomic_write(self.path, state_bytes(state, {"run": self.run_id, "round": str(r)}))
        return written


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (st_load drops it)."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
