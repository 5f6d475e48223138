"""A worker's keys for one round, and the envelopes that carry its shares to one holder each.

Each worker makes two X25519 key pairs per round: one to agree on envelope keys (`c`), one to agree on pairwise
mask seeds (`s`); it publishes both public keys, signed. An envelope from u to v is ChaCha20-Poly1305 under
HKDF-SHA-256(X25519(c_u, c_v)), with the run, round and both names as associated data: only v (or u) opens it, and
an envelope moved to another pair, round or run does not open."""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsync.aggregation.secagg.masks import SEED_BYTES

ENVELOPE_INFO = b"fedsync secagg envelope v1"
RAW_BYTES = 32 + 32 + SEED_BYTES  # RoundSecrets.raw: c, s, the self seed
NONCE_BYTES = 12


class EnvelopeError(ValueError):
    """An envelope that does not open: for another holder, moved, altered, or malformed."""


def public_text(key: X25519PublicKey) -> str:
    return "x25519:" + base64.b64encode(key.public_bytes_raw()).decode()


def public_key(text: str) -> X25519PublicKey:
    """`x25519:` and 32 bytes in base64; ValueError otherwise."""
    if not text.startswith("x25519:"):
        raise ValueError(f"{text[:16]!r} is not an x25519: key")
    try:
        raw = base64.b64decode(text[len("x25519:"):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an x25519 key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an x25519 key is 32 bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class RoundSecrets:
    """A worker's secrets of one round, kept on its own disk, never in the share: `c` opens envelopes, `s` agrees on
    pairwise mask seeds, `self_seed` expands to its self mask."""

    c: X25519PrivateKey
    s: X25519PrivateKey
    self_seed: bytes

    @classmethod
    def generate(cls) -> RoundSecrets:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), secrets.token_bytes(SEED_BYTES))

    def raw(self) -> bytes:
        """The secrets as a worker keeps them on its disk: the two private keys' raw bytes, then the seed."""
        return self.c.private_bytes_raw() + self.s.private_bytes_raw() + self.self_seed

    @classmethod
    def from_raw(cls, raw: bytes) -> RoundSecrets:
        """What `raw` wrote; ValueError for anything else."""
        if len(raw) != RAW_BYTES:
            raise ValueError(f"round secrets are {RAW_BYTES} bytes, not {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(raw[:32]), X25519PrivateKey.from_private_bytes(raw[32:64]),
                   raw[64:])

    def publics(self) -> tuple[str, str]:
        return public_text(self.c.public_key()), public_text(self.s.public_key())


def s_secret(raw: bytes) -> X25519PrivateKey:
    """A dropped worker's pairwise secret, as its shares give it back (32 raw bytes)."""
    return X25519PrivateKey.from_private_bytes(raw)


def _key(own: X25519PrivateKey, other: X25519PublicKey) -> ChaCha20Poly1305:
    shared = own.exchange(other)
    if shared == bytes(32):
        raise EnvelopeError("a low-order public key: no envelope key")
    return ChaCha20Poly1305(HKDF(hashes.SHA256(), 32, None, ENVELOPE_INFO).derive(shared))


def _context(run_id: str, round: int, sender: str, holder: str) -> bytes:
    return f"{run_id}\n{round}\n{sender}\n{holder}\n".encode()


def seal_envelope(data: bytes, own: X25519PrivateKey, holder: X25519PublicKey, run_id: str, round: int,
                  sender: str, holder_name: str) -> bytes:
    """`data` for `holder_name` alone: a random nonce, then the ciphertext with its tag."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + _key(own, holder).encrypt(nonce, data, _context(run_id, round, sender, holder_name))


def open_envelope(envelope: bytes, own: X25519PrivateKey, sender: X25519PublicKey, run_id: str, round: int,
                  sender_name: str, holder_name: str) -> bytes:
    if len(envelope) < NONCE_BYTES + 16:
        raise EnvelopeError("an envelope shorter than its nonce and tag")
    try:
        return _key(own, sender).decrypt(envelope[:NONCE_BYTES], envelope[NONCE_BYTES:],
                                         _context(run_id, round, sender_name, holder_name))
    except InvalidTag:
        raise EnvelopeError(f"the envelope from {sender_name} does not open for {holder_name}: sealed to another "
                            "key, moved from another pair, round or run, or altered") from None


