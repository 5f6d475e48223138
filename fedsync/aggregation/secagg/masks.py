"""Masks: vectors of integers mod 2^32 expanded from a 32-byte seed with the ChaCha20 stream cipher (the
`cryptography` package's), and the seeds two workers agree on without talking (X25519, then HKDF-SHA-256).

A worker's masked input is its encoded update plus its own mask (from its self seed) plus, for each neighbour, the
pairwise mask of the two, added by one and subtracted by the other: in the sum over the round the pairwise masks
cancel, and the self masks are removed once the survivors reveal their seeds' shares. Any slice of a mask can be
expanded on its own (ChaCha20 seeks by its block counter), so masking and unmasking stream through a model in
slices with memory O(slice)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
WORDS_PER_BLOCK = 16  # one ChaCha20 block: 64 bytes, 16 words of 32 bits
PAIR_INFO = b"fedsync secagg pairwise mask v1"
_ZEROS = bytes(1 << 20)  # what the keystream is XORed with, a piece at a time


def expand(seed: bytes, start: int, length: int) -> np.ndarray:
    """Words start..start+length-1 of the mask `seed` expands to (uint32; `start` a multiple of 16)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, not {len(seed)}")
    if start % WORDS_PER_BLOCK:
        raise ValueError(f"a mask slice starts at a multiple of {WORDS_PER_BLOCK} words, not {start}")
    counter = start // WORDS_PER_BLOCK
    nonce = counter.to_bytes(4, "little") + bytes(12)  # OpenSSL's ChaCha20 IV: the block counter, then the nonce
    out = np.empty(length, dtype=np.uint32)
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    view = memoryview(out).cast("B")
    for at in range(0, len(view), len(_ZEROS)):  # the keystream XOR zeros is the keystream itself
        piece = view[at:at + len(_ZEROS)]
        encryptor.update_into(_ZEROS[:len(piece)], piece)
    return out


def pair_seed(own: X25519PrivateKey, other: X25519PublicKey, context: bytes) -> bytes:
    """The seed two workers share: X25519 of one's secret and the other's public key, through HKDF-SHA-256 with
    `context` (the run, the round and both names, in a fixed order) as salt, so no two rounds or pairs share one."""
    shared = own.exchange(other)
    if shared == bytes(32):
        raise ValueError("a low-order public key: no pairwise seed")
    return HKDF(hashes.SHA256(), SEED_BYTES, context, PAIR_INFO).derive(shared)


def pair_context(run_id: str, round: int, a: str, b: str) -> bytes:
    """What makes a pair's seed its own: the run, the round and the two names, sorted."""
    first, second = sorted((a, b))
    return f"{run_id}\n{round}\n{first}\n{second}\n".encode()


def pair_sign(own: str, other: str) -> int:
    """+1 for the worker whose name sorts first, -1 for the other: the pair's masks cancel in the sum."""
    return 1 if own < other else -1
