"""Streaming FedAvg over 32 ResNet-18-sized updates read from safetensors files in the page cache, and the robust
rules and the defaults' close-time screens over the same files.

Prints GB/s of update bytes consumed (read, BLAKE3-verified, checked finite, summed; on the intake's lanes: one
per core, fedsync/aggregation/intake.py) beside baselines measured in the same run over the same files:
- a memory-bound axpy over the same bytes already in memory (no I/O, no checks: the ceiling);
- reading the files in the same 1 MiB pieces and only hashing them with SHA-256, on one thread and on the
  same lanes (hashlib releases the GIL): less work than fedsync does, so a ratio above 1 means the
  single pass with BLAKE3 beats merely hashing with SHA-256;
- the same work done the obvious way, on the same lanes: read a whole file, BLAKE3 it, load it with
  safetensors, check it finite, add it.
Then the same intake of the same updates sealed to the coordinator (confidential_updates, the age format: each
piece also decrypted), as a ratio to the plain intake (issue 32's goal: >= 0.7x) and to ChaCha20-Poly1305 decrypting
as many bytes alone on the same lanes (what bounds it), and the median rule over the sealed files (its slices
decrypt only the chunks they touch).
With FLOWER_PYTHON set to a Python that has Flower (benchmarks/flower_baseline.py says how to install one beside
fedsync), Flower's in-memory FedAvg, median, trimmed mean and Krum run over the same files in the same run, and
each fedsync figure is printed beside Flower's (issue 35's goals: plain intake >= 1.5x Flower's in-memory FedAvg,
sealed >= 1.0x; each robust rule >= 1 GB/s); with --flower-bulyan, Flower's Bulyan too (minutes more).
Peak extra RSS is reported in model sizes (goal: lanes + 1, a running sum per lane and their merge).
Usage: python benchmarks/aggregate.py [N] [--flower-bulyan]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import torch
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from safetensors.torch import load as st_load
from torchvision.models import resnet18

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.defence import Screens, at_close
from fedsync.aggregation.geometry import SLICE
from fedsync.aggregation.intake import PIECE_BYTES, Aggregator, machine_lanes
from fedsync.aggregation.rules import Bulyan, FedAvg, Krum, Median, Rule, TrimmedMean
from fedsync.aggregation.sums import WeightedSum
from fedsync.base.machine import cores
from fedsync.fedavg import apply_delta
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FileRef
from fedsync.storage.sealing import BATCH, CHUNK, SEALED_CHUNK, SealingIdentity, seal, sealed_head
from fedsync.tensors.files import layout_of, save_state

REPEATS = 3


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def timed(nbytes: int, work: Callable[[], object]) -> float:
    """GB/s of `nbytes` consumed by `work`."""
    t = time.perf_counter()
    work()
    return nbytes / (time.perf_counter() - t) / 1e9


def on_lanes(cands: list[Candidate], lanes: int, per_lane: Callable[[list[Candidate]], object]) -> None:
    """Split the files between `lanes` threads as fedsync's intake does, one list each."""
    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(per_lane, [cands[i::lanes] for i in range(lanes)]))


def sha256_files(folder: Path) -> Callable[[list[Candidate]], None]:
    def per_lane(cands: list[Candidate]) -> None:
        piece = bytearray(PIECE_BYTES)
        for c in cands:
            h = hashlib.sha256()
            with open(folder / c.name, "rb", buffering=0) as f:
                while n := f.readinto(piece):
                    h.update(memoryview(piece)[:n])
            h.digest()
    return per_lane


def whole_file_adder(base: dict[str, torch.Tensor], folder: Path) -> Callable[[list[Candidate]], None]:
    def per_lane(cands: list[Candidate]) -> None:
        sums = WeightedSum(layout_of(base))
        for c in cands:
            data = (folder / c.name).read_bytes()
            assert blake3.blake3(data).hexdigest() == c.ref.blake3  # one thread per lane, as in the intake
            update = st_load(data)
            assert all(bool(torch.isfinite(v).all()) for v in update.values() if v.is_floating_point())
            sums.add(update, c.weight)
    return per_lane


def decrypting(nbytes: int) -> Callable[[list[int]], None]:
    """ChaCha20-Poly1305 alone, as age's payload is opened: `decrypt_into` per 64 KiB chunk, 1 MiB at a time from a
    buffer in cache, `nbytes` of plaintext for each lane."""
    def per_lane(_: list[int]) -> None:
        aead, nonce = ChaCha20Poly1305(ChaCha20Poly1305.generate_key()), bytes(12)
        sealed = memoryview(aead.encrypt(nonce, bytes(CHUNK), None) * BATCH)
        out = memoryview(bytearray(CHUNK * BATCH))
        for _ in range(nbytes // (CHUNK * BATCH)):
            for j in range(BATCH):
                aead.decrypt_into(nonce, sealed[j * SEALED_CHUNK:(j + 1) * SEALED_CHUNK], None,
                                  out[j * CHUNK:(j + 1) * CHUNK])
    return per_lane


def flower_figures(folder: Path, byzantine: int, trim: float, bulyan: bool) -> dict[str, Any] | None:
    """Flower's GB/s over the same files, from its own Python (FLOWER_PYTHON); None without one."""
    python = os.environ.get("FLOWER_PYTHON")
    if not python:
        return None
    script = Path(__file__).resolve().parent / "flower_baseline.py"
    done = subprocess.run([python, str(script), str(folder), str(byzantine), str(trim), *(["bulyan"] * bulyan)],
                          capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def beside(ours: float, flower: dict[str, Any] | None, rule: str) -> str:
    if flower is None or rule not in flower:
        return ""
    runs = ", ".join(f"{r:.2f}" for r in flower[f"{rule}_runs"])
    return (f"; Flower {flower['version']}'s in memory {flower[rule]:.2f} GB/s (runs {runs}) -> "
            f"{ours / flower[rule]:.2f}x")


def main(n: int = 32, flower_bulyan: bool = False) -> None:
    base = {k: v.float() if v.is_floating_point() else v for k, v in resnet18(num_classes=1000).state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    params = sum(v.numel() for v in base.values())
    lanes = machine_lanes(layout_of(base))  # as an Aggregator chooses
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = LocalStore(folder)
        cands = []
        for i in range(n):
            update = {k: (torch.randn(v.shape, generator=g) * 1e-3).to(v.dtype) for k, v in base.items()}
            name = f"w{i}.safetensors"
            cands.append(Candidate(f"w{i}", name, save_state(store.write, name, update), weight=float(100 + i)))
        del update
        total = sum(c.ref.bytes for c in cands)
        for c in cands:
            (folder / c.name).read_bytes()  # into the page cache

        # fedsync first: a baseline run before it leaves its freed sums in the allocator, hiding fedsync's own RSS
        rates, extras = [], []
        for _ in range(REPEATS):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
            before = rss_kib("VmRSS")
            t = time.perf_counter()
            agg = Aggregator(layout_of(base), store)
            outcomes = agg.take(cands)
            result = apply_delta(base, FedAvg().aggregate(agg.collected(frozenset(base))).delta)
            rates.append(total / (time.perf_counter() - t) / 1e9)
            extras.append((rss_kib("VmHWM") - before) * 1024 / model_bytes)
            assert all(o.problem is None for o in outcomes) and all(torch.isfinite(v.float()).all()
                                                                    for v in result.values())
            del agg, result

        # the robust rules and the default close-time screens: the same intake, then every update file read again in
        # aligned slices (the screens: the median direction, then clipping to clip_factor x the median norm)
        robust, robust_rss, rule_only = {}, {}, {}
        byzantine = (n - 3) // 4  # the most Bulyan tolerates with n updates
        screens = Screens(10.0, 10.0, 0.0, 2.0, True)
        rules: list[tuple[str, Rule | None]] = [("defaults' close-time screens, then FedAvg", None), *(
            (r.name, r) for r in (Median(), TrimmedMean(0.1), Krum(byzantine, multi=False),
                                  Krum(byzantine, multi=True), Bulyan(byzantine)))]
        for name, rule in rules:
            Path("/proc/self/clear_refs").write_text("5")
            before = rss_kib("VmRSS")
            t = time.perf_counter()
            agg = Aggregator(layout_of(base), store)
            agg.take(cands)
            ruled = time.perf_counter()
            if rule is None:
                at_close(agg, screens, {k: v.numel() for k, v in base.items() if v.is_floating_point()})
            result = apply_delta(base, (rule or FedAvg()).aggregate(agg.collected(frozenset(base))).delta)
            agg.close()
            robust[name], rule_only[name] = time.perf_counter() - t, time.perf_counter() - ruled
            robust_rss[name] = (rss_kib("VmHWM") - before) * 1024 / model_bytes
            assert all(torch.isfinite(v.float()).all() for v in result.values())
            del agg, result

        flower = flower_figures(folder, byzantine, 0.1, flower_bulyan)

        # the same updates sealed to the coordinator: the intake also decrypts every piece it reads
        opener = SealingIdentity.generate()
        sealed = []
        for c in cands:
            name = c.name + ".age"
            data = seal((folder / c.name).read_bytes(), opener.recipient)
            store.write(name, data)
            sealed.append(Candidate(c.worker, name, FileRef(name, blake3.blake3(data).hexdigest(), len(data)),
                                    c.weight, sealed=True, head=sealed_head(data)))
            (folder / name).read_bytes()  # into the page cache
        sealed_rates: dict[bool, list[float]] = {True: [], False: []}  # with the signed head, and hashed whole
        for _ in range(REPEATS):
            for headed in (True, False):
                batch = sealed if headed else [replace(c, head=None) for c in sealed]
                t = time.perf_counter()
                agg = Aggregator(layout_of(base), store, opener=opener)
                outcomes = agg.take(batch)
                result = apply_delta(base, FedAvg().aggregate(agg.collected(frozenset(base))).delta)
                sealed_rates[headed].append(total / (time.perf_counter() - t) / 1e9)
                assert all(o.problem is None for o in outcomes)
                del agg, result
        t = time.perf_counter()
        agg = Aggregator(layout_of(base), store, opener=opener)
        agg.take(sealed)
        apply_delta(base, Median().aggregate(agg.collected(frozenset(base))).delta)
        sealed_median = time.perf_counter() - t
        del agg

        # baseline 1: axpy over the same number of bytes, already in memory (memory-bound, no I/O, no checks)
        flat = torch.randn(model_bytes // 4, generator=g)
        acc = torch.zeros_like(flat)
        axpy = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            for c in cands:
                acc.add_(flat, alpha=c.weight)
            axpy.append(total / (time.perf_counter() - t) / 1e9)
        del flat, acc
        sha = {k: timed(total, lambda: on_lanes(cands, k, sha256_files(folder))) for k in sorted({1, lanes})}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one torch thread per lane, as the intake runs
        whole = timed(total, lambda: on_lanes(cands, lanes, whole_file_adder(base, folder)))
        cipher = timed(total, lambda: on_lanes(list(range(lanes)), lanes, decrypting(total // lanes)))
        torch.set_num_threads(threads)

    fed, base_axpy = statistics.median(rates), statistics.median(axpy)
    print(f"aggregate: {n} updates x {params / 1e6:.1f} M params ({model_bytes / 1e6:.1f} MB each, "
          f"{total / 1e9:.2f} GB), {cores()} cores: intake on {lanes} lanes, slices on {cores()}")
    print(f"  streaming FedAvg (read + BLAKE3 + finite check and norm + sum): {fed:.2f} GB/s "
          f"(runs {', '.join(f'{r:.2f}' for r in rates)}){beside(fed, flower, 'fedavg')} (goal >= 1.5x Flower's)")
    print(f"  baseline axpy in memory: {base_axpy:.2f} GB/s -> ratio {fed / base_axpy:.2f}x")
    for k, rate in sha.items():
        print(f"  baseline read + SHA-256 only, {k} lane(s): {rate:.2f} GB/s -> ratio {fed / rate:.2f}x")
    print(f"  baseline whole file read, BLAKE3, safetensors load, finite check, add, {lanes} lanes: {whole:.2f} GB/s "
          f"-> ratio {fed / whole:.2f}x")
    fedavg_s = total / fed / 1e9
    print(f"  robust rules (krum, multi_krum, bulyan with byzantine {byzantine}): each holds one slice of every "
          f"update on each of {cores()} lanes, {n * SLICE * 4 / 2**20:.0f} MiB, once more while ordering it, and "
          f"{n}x{n} distances")
    for name, seconds in robust.items():
        print(f"  {name}: intake and rule {seconds:.2f} s against streaming FedAvg's {fedavg_s:.2f} s "
              f"({seconds / fedavg_s:.1f}x); the rule alone {rule_only[name]:.2f} s = "
              f"{total / rule_only[name] / 1e9:.2f} GB/s of updates (goal >= 1)"
              f"{beside(total / rule_only[name] / 1e9, flower, name)}; peak extra RSS "
              f"{robust_rss[name]:.2f} model sizes")
    sealed_fed = statistics.median(sealed_rates[True])
    whole_fed = statistics.median(sealed_rates[False])
    print(f"  sealed updates (age: ChaCha20-Poly1305 in 64 KiB chunks), streaming FedAvg, the signed head hashed and "
          f"the payload proved by its tags: {sealed_fed:.2f} GB/s of plaintext (runs "
          f"{', '.join(f'{r:.2f}' for r in sealed_rates[True])}) -> ratio {sealed_fed / fed:.2f}x the plain intake"
          f"{beside(sealed_fed, flower, 'fedavg')} (goal >= 1.0x Flower's)")
    print(f"  baseline: ChaCha20-Poly1305 decryption alone of as many bytes (64 KiB chunks, in cache) on the same "
          f"{lanes} lanes: {cipher:.2f} GB/s -> ratio {sealed_fed / cipher:.2f}x (the intake also reads, hashes the "
          "head, checks, measures and adds every piece)")
    print(f"  baseline: the same sealed files hashed whole as well (markers without sealed_head): {whole_fed:.2f} "
          f"GB/s (runs {', '.join(f'{r:.2f}' for r in sealed_rates[False])}) -> the head alone is "
          f"{sealed_fed / whole_fed:.2f}x")
    print(f"  sealed updates, median: intake and rule {sealed_median:.2f} s against the plain median's "
          f"{robust['median']:.2f} s ({sealed_median / robust['median']:.2f}x)")
    print(f"  peak extra RSS: {max(extras):.2f} model sizes ({max(extras) * model_bytes / 2**20:.0f} MiB); "
          f"goal <= {lanes + 1} (lanes + 1)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=32, help="updates (default 32)")
    parser.add_argument("--flower-bulyan", action="store_true", help="also time Flower's Bulyan (FLOWER_PYTHON)")
    args = parser.parse_args()
    main(args.n, args.flower_bulyan)
