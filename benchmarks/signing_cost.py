"""Signing cost: what signatures add to a worker's update and to the coordinator's intake, for a ResNet-18-sized
update, beside the time to write that update (save_state: serialise, BLAKE3, write whole) measured in the same
run. The signature covers the marker's fields, tensors' hash included, which writing computes anyway, so the
cost does not grow with the model.

Usage: python benchmarks/signing_cost.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models import resnet18

from fedsync.storage.keys import load_identity
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FORMAT_VERSION, UpdateMarker
from fedsync.storage.signing import update_message, verify
from fedsync.tensors.files import save_state

REPEATS = 15


def main() -> None:
    update = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in resnet18().state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        identity = load_identity(Path(tmp) / "keys" / "worker.pem")[0]
        writes, signs, checks = [], [], []
        for i in range(REPEATS):
            t = time.perf_counter()
            ref = save_state(store.write, f"u{i}.safetensors", update)
            writes.append(time.perf_counter() - t)
            marker = UpdateMarker(format=FORMAT_VERSION, round=3, worker="w1", base="ab" * 32, tensors=ref,
                                  samples=5000, steps=40, train_loss=0.5, seconds=10.0, device="cuda:0")
            t = time.perf_counter()
            marker.signature = identity.sign(update_message("run", marker))
            signs.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert verify(identity.public, update_message("run", marker), marker.signature)
            checks.append(time.perf_counter() - t)
            (Path(tmp) / f"u{i}.safetensors").unlink()
    write, sign, check = (statistics.median(x) for x in (writes, signs, checks))
    mib = ref.bytes / 2**20
    print(f"ResNet-18 update, {mib:.1f} MiB, medians of {REPEATS}:")
    print(f"  writing the update (baseline): {write * 1000:.1f} ms")
    print(f"  signing its marker (worker):   {sign * 1e6:.0f} us = {100 * sign / write:.3f} % of the write")
    print(f"  verifying it (coordinator):    {check * 1e6:.0f} us = {100 * check / write:.3f} % of the write")


if __name__ == "__main__":
    main()
