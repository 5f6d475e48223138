"""Hash speed on this machine: SHA-256 (hashlib) and BLAKE3 (the `blake3` package, which fedsync uses), on one
thread and on two, over the same 256 MiB buffer in memory. BLAKE3 on one thread is printed as a ratio to
SHA-256 on one thread, the baseline. This is why fedsync hashes with BLAKE3 (docs/BENCHMARKS.md).
Usage: python benchmarks/hash_speed.py [MIB]
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import blake3

REPEATS = 5


def rate(data: bytes, threads: int, digest: Callable[[memoryview], object]) -> float:
    """GB/s over `data`, split into `threads` equal parts hashed at once (both libraries release the GIL)."""
    part = len(data) // threads
    views = [memoryview(data)[i * part:(i + 1) * part] for i in range(threads)]
    runs = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(REPEATS):
            t = time.perf_counter()
            list(pool.map(digest, views))
            runs.append(part * threads / (time.perf_counter() - t) / 1e9)
    return statistics.median(runs)


def main(mib: int = 256) -> None:
    data = bytes(range(256)) * (mib * 4096)
    hashes = {"SHA-256": lambda v: hashlib.sha256(v).digest(), "BLAKE3": lambda v: blake3.blake3(v).digest()}
    print(f"hash speed over {mib} MiB in memory, median of {REPEATS}:")
    base = rate(data, 1, hashes["SHA-256"])
    for name, digest in hashes.items():
        for threads in (1, 2):
            r = base if (name, threads) == ("SHA-256", 1) else rate(data, threads, digest)
            print(f"  {name:8s} {threads} thread(s): {r:5.2f} GB/s -> ratio to SHA-256 on one thread {r / base:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
