"""Ed25519 signatures over the share's decisions: what exactly is signed, and checking it.

A signed record's message is a few lines of `key value` in a fixed order (docs/PROTOCOL.md section 5.10), never
the YAML bytes: any language can rebuild it from the parsed fields, and fields that do not decide anything
(times, losses) stay out. The cryptography itself is the `cryptography` package's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    FinalMarker,
    MarkerError,
    OutputMarker,
    UpdateMarker,
)

PREFIX = "ed25519:"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def _decode(text: str, size: int, what: str) -> bytes:
    if not text.startswith(PREFIX):
        raise MarkerError(f"{what} {text[:20]!r}… does not start with {PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise MarkerError(f"{what} is not base64") from None
    if len(raw) != size:
        raise MarkerError(f"{what} has {len(raw)} bytes, not {size}")
    return raw


def public_text(key: Ed25519PrivateKey) -> str:
    """A public key as the share writes it: `ed25519:` and the 32 raw bytes in base64."""
    return PREFIX + base64.b64encode(key.public_key().public_bytes_raw()).decode()


def canonical_public(text: str) -> str:
    """A public key in the one spelling the share writes: the same 32 bytes however a person's copy pads or
    spaces them; MarkerError when it is no key."""
    return PREFIX + base64.b64encode(_decode(text.strip(), KEY_BYTES, "public key")).decode()


def fingerprint(public: str) -> str:
    """What people compare: the first 16 hex digits of the raw key's SHA-256, in groups of four."""
    digest = hashlib.sha256(_decode(public, KEY_BYTES, "public key")).hexdigest()[:16]
    return "-".join(digest[i:i + 4] for i in range(0, 16, 4))


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return PREFIX + base64.b64encode(key.sign(message)).decode()


def verify(public: str, message: bytes, signature: str | None) -> bool:
    """Whether `signature` is `public`'s over `message`; a missing or malformed one is simply not valid."""
    if not signature:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(_decode(public, KEY_BYTES, "public key"))
        key.verify(_decode(signature, SIGNATURE_BYTES, "signature"), message)
    except (InvalidSignature, MarkerError, ValueError):
        return False
    return True


def message(kind: str, fields: Iterable[tuple[str, object]]) -> bytes:
    lines = [f"fedsync {kind} v{FORMAT_VERSION}"]  # the share format: a signature never carries over to another
    for key, value in fields:
        text = "-" if value is None else str(value)
        if "\n" in text or " " in text:
            raise MarkerError(f"{key}: {text!r} cannot be signed (spaces or line breaks)")
        lines.append(f"{key} {text}")
    return ("\n".join(lines) + "\n").encode()


def update_message(run_id: str, m: UpdateMarker) -> bytes:
    """What a worker signs: whose update, for which run, round and base model, which bytes, its weight, and (when not
    none) how the bytes encode the delta."""
    fields: list[tuple[str, object]] = [
        ("run", run_id), ("round", m.round), ("worker", m.worker), ("base", m.base),
        ("tensors", m.tensors.blake3 if m.tensors else None), ("bytes", m.tensors.bytes if m.tensors else None),
        ("samples", m.samples), ("steps", m.steps), ("diverged", "yes" if m.diverged is not None else "no")]
    if m.encoding != "none":
        fields.append(("encoding", m.encoding))
    if m.encryption != "none":
        fields.append(("encryption", m.encryption))
    if m.sealed_head is not None:
        fields.append(("sealed_head", m.sealed_head))
    if m.worker_epsilon is not None:
        fields.append(("worker_epsilon", repr(m.worker_epsilon)))
    return message("update", fields)


def recipient_message(run_id: str, recipient: str) -> bytes:
    """What the coordinator signs in fedsync.yaml: the key its workers seal their updates to. Unsigned, anyone who
    can write the share could swap in their own key and read every update sealed after."""
    return message("recipient", [("run", run_id), ("recipient", recipient)])


def assignment_message(a: Assignment) -> bytes:
    """What the coordinator signs when it opens a round: the model to start from and every worker's task."""
    fields: list[tuple[str, object]] = [
        ("run", a.run_id), ("round", a.round), ("rounds", a.rounds), ("model", a.model.blake3),
        ("bytes", a.model.bytes), ("num_shards", a.num_shards), ("shards", a.shards.blake3 if a.shards else None),
        ("time_budget_ms", round(a.time_budget_s * 1000))]
    for name in sorted(a.workers):
        t = a.workers[name]
        steps = "-" if t.local_steps is None else t.local_steps
        fields.append(("worker", f"{name}/{'-' if t.shard is None else t.shard}/{t.local_epochs}/{steps}"))
        if t.samples is not None:
            fields.append(("own_samples", f"{name}/{t.samples}"))
    return message("assignment", fields)


def final_message(f: FinalMarker) -> bytes:
    """What the coordinator signs when the run ends: the final model."""
    fields: list[tuple[str, object]] = [("run", f.run_id), ("round", f.round), ("model", f.model.blake3),
                                        ("bytes", f.model.bytes)]
    if f.stopped_because is not None:
        fields += [("stopped", f.stopped_because.replace(" ", "_")), ("epsilon", repr(f.epsilon))]
    return message("final", fields)


def trust_message(run_id: str, entries: dict[str, tuple[str, str]]) -> bytes:
    """What the coordinator signs in trust.yaml: each worker's name, trusted key and how it came to be trusted."""
    return message("trust", [("run", run_id), *(("worker", f"{n}/{state}/{key}")
                                                 for n, (key, state) in sorted(entries.items()))])


def output_message(m: OutputMarker) -> bytes:
    """What a worker signs for a chunk it ran: whose predictions, for which job, chunk, inputs and model, which
    bytes, and which inputs it could not predict."""
    failed = ",".join(str(f.row) for f in m.failed) or None
    return message("output", [("job", m.job), ("chunk", m.chunk), ("worker", m.worker), ("inputs", m.inputs),
                               ("model", m.model), ("outputs", m.outputs.blake3 if m.outputs else None),
                               ("bytes", m.outputs.bytes if m.outputs else None), ("rows", m.rows),
                               ("error", "yes" if m.error is not None else "no"), ("failed", failed)])
