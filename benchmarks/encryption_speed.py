"""How fast a coordinator could open encrypted updates (issue 32: confidential updates must keep the intake at
>= 0.7x plain's GB/s): decryption of one ResNet-18-sized update (46.8 MB) by each reviewed construction within
reach, beside BLAKE3 over the same bytes (the intake already hashes every byte once) in the same run.

- ChaCha20-Poly1305 and AES-256-GCM from `cryptography`, one call per chunk of 64 KiB (the age format's payload
  chunks) and of 1 MiB: the cost of the AEAD itself under a chunked stream such as age's.
- age through pyrage (`decrypt_io`): the standard format a person can open with the `age` tool.
- Tink's streaming AEAD, AES256_GCM_HKDF_1MB (`tink`): a reviewed streaming construction, no standard CLI.

Needs `pip install pyrage tink` beside fedsync (they are not fedsync dependencies). One thread each.
Usage: python benchmarks/encryption_speed.py
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable

import blake3
import pyrage
import tink
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from tink import streaming_aead

SIZE = 46_800_000  # one ResNet-18 float32 update
REPEATS = 5


def rate(work: Callable[[], object]) -> float:
    """GB/s of SIZE bytes, the median of REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        work()
        runs.append(SIZE / (time.perf_counter() - t) / 1e9)
    return statistics.median(runs)


def chunked(cls: type, chunk: int, payload: bytes) -> Callable[[], None]:
    key = cls.generate_key(256) if cls is AESGCM else cls.generate_key()
    aead = cls(key)
    sealed = [aead.encrypt(i.to_bytes(12, "big"), payload[i * chunk:(i + 1) * chunk], None)
              for i in range(-(-len(payload) // chunk))]

    def work() -> None:
        for i, c in enumerate(sealed):
            aead.decrypt(i.to_bytes(12, "big"), c, None)
    return work


def main() -> None:
    payload = os.urandom(SIZE)
    piece = 1 << 20
    baseline = rate(lambda: [blake3.blake3(payload[i:i + piece]) for i in range(0, SIZE, piece)])
    results = {f"{cls.__name__} {chunk // 1024} KiB chunks": rate(chunked(cls, chunk, payload))
               for cls in (ChaCha20Poly1305, AESGCM) for chunk in (64 << 10, 1 << 20)}
    identity = pyrage.x25519.Identity.generate()
    sealed = io.BytesIO()
    pyrage.encrypt_io(io.BytesIO(payload), sealed, [identity.to_public()])
    results["age (pyrage.decrypt_io)"] = rate(
        lambda: pyrage.decrypt_io(io.BytesIO(sealed.getvalue()), io.BytesIO(), [identity]))
    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    primitive = handle.primitive(streaming_aead.StreamingAead)
    out = io.BytesIO()
    out.close = lambda: None  # type: ignore[method-assign]  # Tink closes the stream it wrote to; keep the bytes
    with primitive.new_encrypting_stream(out, b"") as enc:
        enc.write(payload)
    ciphertext = out.getvalue()

    def tink_decrypt() -> None:
        with primitive.new_decrypting_stream(io.BytesIO(ciphertext), b"") as dec:
            while dec.read(1 << 20):
                pass
    results["Tink AES256_GCM_HKDF_1MB stream"] = rate(tink_decrypt)
    print(f"decrypting {SIZE / 1e6:.1f} MB, one thread, median of {REPEATS}")
    print(f"  baseline BLAKE3 in 1 MiB pieces: {baseline:.2f} GB/s")
    for name, r in results.items():
        print(f"  {name}: {r:.2f} GB/s -> {r / baseline:.2f}x BLAKE3")


if __name__ == "__main__":
    main()
