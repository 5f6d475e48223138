"""What secure aggregation's maths costs (fedsync/aggregation/secagg/), for a ResNet-18-sized update (11.7 M
parameters) at 5, 20 and 100 workers, a tenth of them (at least one) dropping after they shared their secrets:

- a worker: its keys, its envelopes to its k + 1 holders, and its masked input (its self mask and k pairwise masks
  expanded with ChaCha20 and added, slice by slice), against encoding the same update to integers alone;
- the coordinator: taking the masks out of the sum of the survivors' masked inputs (their self masks, and the
  pairwise masks they share with the dropped, whose secrets come back from the revealed shares; on two lanes, as the
  coordinator does), against summing the
  same number of plain float32 updates held in memory (the plain intake's ceiling: no I/O, no checks);
- the bytes each worker writes, against a plain float32 update.

The whole round through the share (files, rosters, deadlines) is not measured here: that protocol is not built yet.
Usage: python benchmarks/secagg.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedsync.aggregation.secagg import shamir
from fedsync.aggregation.secagg.encoding import Encoding
from fedsync.aggregation.secagg.envelope import RoundSecrets
from fedsync.aggregation.secagg.graph import build, degree
from fedsync.aggregation.secagg.rounds import Round, add_masks, masks_of, masks_to_remove, reveal, share_out
from fedsync.base.machine import cores

PARAMS = 11_689_512  # ResNet-18's state, as benchmarks/aggregate.py builds it
SLICE = 1 << 20  # words per slice: 4 MiB, as the intake streams


def _timed(work: Callable[[], object]) -> float:
    t = time.perf_counter()
    work()
    return time.perf_counter() - t


def main() -> None:
    g = np.random.default_rng(0)
    update = np.clip(g.normal(size=PARAMS) * 1e-3, -1, 1)
    print(f"secure aggregation's maths: {PARAMS / 1e6:.1f} M parameters, slices of {SLICE} words")
    for n in (5, 20, 100):
        names = [f"w{i:03d}" for i in range(n)]
        dropped = set(names[:max(1, n // 10)])
        enc = Encoding(clip=1.0, max_weight=1000, workers=n)
        secrets = {w: RoundSecrets.generate() for w in names}
        c_pub = {w: secrets[w].publics()[0] for w in names}
        s_pub = {w: secrets[w].publics()[1] for w in names}
        r = Round("bench", 1, build(names, "seed"))
        encode_s = min(_timed(lambda: enc.encode(update, 500)) for _ in range(3))
        encoded = enc.encode(update, 500)

        w = names[-1]
        t = time.perf_counter()
        envelopes = {s: share_out(r, s, secrets[s], c_pub) for s in [w]}
        masks = masks_of(r, w, secrets[w], s_pub, set(names))
        for start in range(0, PARAMS, SLICE):
            add_masks(encoded[start:start + SLICE], start, masks)
        mask_s = time.perf_counter() - t

        envelopes = {s: share_out(r, s, secrets[s], c_pub) for s in names}
        survivors = set(names) - dropped
        revealed = {h: reveal(r, h, secrets[h], {s: envelopes[s][h] for s in names if h in envelopes[s]}, c_pub,
                              set(names), survivors) for h in sorted(survivors)}
        total = np.zeros(PARAMS, dtype=np.uint32)  # the survivors' masked inputs, summed (their content: any)
        t = time.perf_counter()
        masks = masks_to_remove(r, revealed, s_pub, set(names), survivors)
        with ThreadPoolExecutor(cores()) as pool:  # as the coordinator does, a lane per core
            list(pool.map(lambda at: add_masks(total[at:at + SLICE], at, masks, -1), range(0, PARAMS, SLICE)))
        unmask_s = time.perf_counter() - t

        plain = np.zeros(PARAMS, dtype=np.float32)
        one = update.astype(np.float32)
        t = time.perf_counter()
        for _ in survivors:
            plain += one
        sum_s = time.perf_counter() - t
        k = degree(n)
        envelope_bytes = sum(len(e) for e in envelopes[w].values())
        written = 4 * (PARAMS + 16) + envelope_bytes + 2 * 60
        print(f"  n={n:3d} (k={k}, threshold {r.graph.threshold(w)}, {len(dropped)} dropped after sharing): a worker's "
              f"envelopes and masks {mask_s:.2f} s ({mask_s / encode_s:.1f}x encoding the update alone, "
              f"{encode_s:.2f} s); coordinator's "
              f"unmasking {unmask_s:.2f} s ({unmask_s / sum_s:.1f}x summing {len(survivors)} plain updates in "
              f"memory, {sum_s:.2f} s); a worker writes {written / 1e6:.2f} MB ({written / (4 * PARAMS):.4f}x a "
              f"plain float32 update), {envelope_bytes / 1e3:.1f} kB of it envelopes of "
              f"{2 * shamir.SHARE_BYTES} bytes of shares each")


if __name__ == "__main__":
    main()
