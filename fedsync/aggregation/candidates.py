"""What the intake is handed and what it hands back: an update whose marker passed its checks (a Candidate), and
the verdict on it (an Outcome: counted, or the reason it was not)."""

from __future__ import annotations

from dataclasses import dataclass

from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Unusable
from fedsync.tensors.encoding import NONE


@dataclass(frozen=True)
class Candidate:
    """An update whose marker passed its checks; its tensor file is what remains to verify."""

    worker: str
    name: str  # the tensor file's name in the share
    ref: FileRef
    weight: float
    round: int = 0  # the round the update was trained for (a late one's is older than the open round's)
    steps: int = 1  # local optimizer steps, for rules that normalise by them (FedNova)
    encoding: str = NONE  # how the file holds the delta (fedsync/tensors/encoding.py)
    sealed: bool = False  # the file is sealed to the coordinator (fedsync/storage/sealing.py)
    head: str | None = None  # sealed: BLAKE3 of its header and payload nonce, which with the payload's tags prove the
    # file (its whole-file hash is then not taken on the intake's path); None: the whole file is hashed


@dataclass
class Outcome:
    candidate: Candidate
    problem: Unusable | None = None
