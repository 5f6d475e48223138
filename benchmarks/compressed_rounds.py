"""Round time over a real Syncthing pair (127.0.0.1, fedsync's --syncthing nudges) with a ResNet-18 model
(resnet18_cifar, 11.2 M parameters, a 44.7 MB update in float32): int8 updates against uncompressed, and both
against the same run on one local share, measured in the same run. Syncthing's own rate limit holds each
instance to RATE_KIB_S each way (6,400 KiB/s, about 52 Mbit/s: a home uplink or a tailnet between two houses),
since a link over loopback is faster than any real one. Both workers sit on the far copy, so every
update crosses Syncthing; the global model crosses in float32 either way. Training is one step of 8 fabricated
CIFAR-10 images a round (tests/cifar_files.py), so the round time is the files' time.

Usage: python benchmarks/compressed_rounds.py [ROUNDS] [RATE_KIB_S]   (default 5 and 6400, 0 for no limit;
prints medians of rounds 2..ROUNDS)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the Syncthing and CIFAR helpers

from benchmarks.syncthing_rounds import run  # noqa: E402
from tests.cifar_files import fabricate_cifar10  # noqa: E402
from tests.syncthing import SyncthingPair  # noqa: E402


def main(rounds: int = 5, rate_kib_s: int = 6400) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fabricate_cifar10(t / "cifar")
        base = ("--config", "cifar10", "--set", f"data_root={t / 'cifar'}", "--set", "verify_checksums=false",
                "--set", "local_steps=1", "--set", "batch_size=8", "--set", "eval_samples=16",
                "--set", "round_timeout=600", "--set", "worker_timeout=120")
        times: dict[str, list[float]] = {}
        for encoding in ("none", "int8"):
            settings = (*base, "--set", f"compression={encoding}")
            (t / f"local-{encoding}").mkdir()
            local = t / f"local-{encoding}"
            times[f"local {encoding}"] = run(local, [local, local], rounds, settings=settings)
            a, b = t / f"A-{encoding}", t / f"B-{encoding}"
            with SyncthingPair(t / f"pair-{encoding}", a, b, rate_kib_s=rate_kib_s) as pair:
                apis = {copy: inst.fedsync_args() for copy, inst in zip((a, b), pair.instances)}
                times[f"syncthing {encoding}"] = run(a, [b, b], rounds, apis, settings)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"round time, ResNet-18 (resnet18_cifar), 2 workers on the far copy, Syncthing limited to "
              f"{rate_kib_s or 'no'} KiB/s, rounds 2..{rounds}, medians:")
        for k, v in m.items():
            print(f"  {k}: {v:.2f} s  ({' '.join(f'{x:.2f}' for x in times[k])})")
        added = {e: m[f"syncthing {e}"] - m[f"local {e}"] for e in ("none", "int8")}
        whole = m["syncthing int8"] / m["syncthing none"]
        print(f"  Syncthing adds {added['none']:.2f} s a round uncompressed, {added['int8']:.2f} s with int8: "
              f"{added['int8'] / added['none']:.2f}x; whole round int8/none {whole:.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
