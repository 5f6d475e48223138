"""t-of-n Shamir secret sharing over the prime field of p = 2^521 - 1 (a Mersenne prime, so a 32-byte secret, a
mask seed or an X25519 private key, is one field element). Any t shares give the secret back; fewer give a value
independent of it. Shares are evaluated at x = 1..n; x = 0 is the secret."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # a field element, big-endian


class ShareError(ValueError):
    """Shares that cannot give a secret back: too few, repeated or out-of-field points, or a reconstruction that is
    not a 32-byte secret (shares of different secrets mixed, or altered)."""


def split(secret: bytes, threshold: int, points: list[int]) -> dict[int, int]:
    """The shares of `secret` at each x in `points` (distinct, 1 <= x < p): a random polynomial of degree
    `threshold` - 1 whose value at 0 is the secret."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ShareError(f"threshold {threshold} needs between 1 and {len(points)} shares")
    if len(set(points)) != len(points) or not all(0 < x < PRIME for x in points):
        raise ShareError("share points must be distinct and between 1 and p - 1")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in points}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from any `threshold` of its shares (x -> y), by Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} share(s), {threshold} needed")
    points = sorted(shares)[:threshold]
    if not all(0 < x < PRIME and 0 <= shares[x] < PRIME for x in points):
        raise ShareError("a share lies outside the field")
    secret = 0
    for i in points:
        numerator, denominator = 1, 1
        for j in points:
            if j != i:
                numerator = numerator * -j % PRIME
                denominator = denominator * (i - j) % PRIME
        secret = (secret + shares[i] * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not give a 32-byte secret: shares of different secrets, or altered")
    return secret.to_bytes(SECRET_BYTES, "big")


def to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, not {len(data)}")
    return int.from_bytes(data, "big")
