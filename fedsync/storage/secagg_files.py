"""The files of a secure-aggregation round (docs/PROTOCOL.md section 5.16): what each holds, and what its writer
signs. Each has one writer: a worker's keys, envelopes and revealed shares are its own files; the rosters that name
who is still in the round are the coordinator's."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsync.storage.hashing import hash_bytes
from fedsync.storage.signing import message


@dataclass
class SecaggKeys:
    """NNNN/secagg/keys/<worker>.yaml: step 1, the worker's two public keys of the round."""

    format: int
    round: int
    worker: str
    c_key: str  # x25519:...: envelopes to this worker are sealed with it
    s_key: str  # x25519:...: its pairwise mask seeds are agreed with it
    signature: str | None = None


@dataclass
class SecaggShares:
    """NNNN/secagg/shares/<worker>.yaml: step 2, one envelope (base64) per holder of the worker's secrets."""

    format: int
    round: int
    worker: str
    envelopes: dict[str, str] = field(default_factory=dict)
    signature: str | None = None


@dataclass
class SecaggRoster:
    """NNNN/secagg/roster-<step>.yaml: the coordinator names who is still in the round after each step, the
    encoding every masked input uses, and (step 1) each named worker's two public keys, `c_key s_key`, as the
    coordinator checked them against the worker's signature."""

    format: int
    run_id: str
    round: int
    step: int
    workers: list[str]
    clip: float
    max_weight: int
    keys: dict[str, str] = field(default_factory=dict)
    signature: str | None = None


@dataclass
class SecaggReveal:
    """NNNN/secagg/reveal/<worker>.yaml: step 4, for each sender whose envelope the worker held, `self:` or
    `pair:` and the share (base64) of that one secret."""

    format: int
    round: int
    worker: str
    shares: dict[str, str] = field(default_factory=dict)
    signature: str | None = None


def _digest(entries: dict[str, str]) -> str:
    """One hash for a mapping of names to base64 texts: BLAKE3 of `name value` lines, sorted by name."""
    return hash_bytes("".join(f"{k} {v}\n" for k, v in sorted(entries.items())).encode())


def keys_message(run_id: str, m: SecaggKeys) -> bytes:
    return message("secagg-keys", [("run", run_id), ("round", m.round), ("worker", m.worker), ("c", m.c_key),
                                   ("s", m.s_key)])


def shares_message(run_id: str, m: SecaggShares) -> bytes:
    return message("secagg-shares", [("run", run_id), ("round", m.round), ("worker", m.worker),
                                     ("envelopes", _digest(m.envelopes))])


def roster_message(m: SecaggRoster) -> bytes:
    return message("secagg-roster", [("run", m.run_id), ("round", m.round), ("step", m.step),
                                     ("workers", ",".join(m.workers) or "-"), ("clip", repr(m.clip)),
                                     ("max_weight", m.max_weight), ("keys", _digest(m.keys))])


def reveal_message(run_id: str, m: SecaggReveal) -> bytes:
    return message("secagg-reveal", [("run", run_id), ("round", m.round), ("worker", m.worker),
                                     ("shares", _digest(m.shares))])
