"""Flower's own aggregation functions over the same update files benchmarks/aggregate.py wrote, loaded into memory
first (Flower aggregates NumPy arrays it already holds): its in-memory FedAvg (`aggregate`), median, trimmed
mean and Krum, timed alone, in GB/s of the files' bytes. Run by benchmarks/aggregate.py with Flower's own Python,
never imported into fedsync's: Flower pins its own versions of what fedsync uses.

Install Flower beside fedsync without touching fedsync's environment:
    python3 -m venv /tmp/flower && /tmp/flower/bin/pip install flwr safetensors
    FLOWER_PYTHON=/tmp/flower/bin/python python benchmarks/aggregate.py

Flower's Bulyan runs only when asked (BULYAN, from aggregate.py's --flower-bulyan): it runs Krum theta times over
the updates, each time computing all n^2 distances with a Python double loop over the flattened models (minutes for
32 ResNet-18 updates).
Usage (by aggregate.py): FLOWER_PYTHON benchmarks/flower_baseline.py FOLDER BYZANTINE TRIM [bulyan]
Prints one JSON object: {"version": ..., "fedavg": GB/s, "median": ..., "trimmed_mean": ..., "krum": ...,
["bulyan": ...]}, each the median of three runs (Krum's and Bulyan's of one; each rule's runs beside it). The first
run of each pays the page faults of its fresh arrays: Flower's FedAvg ran at 0.6 GB/s first and 6.3 GB/s after on
the same VM.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import flwr
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from safetensors.numpy import load_file


def main(folder: Path, byzantine: int, trim: float, bulyan: bool) -> None:
    files = sorted(folder.glob("w*.safetensors"), key=lambda p: int(p.stem[1:]))
    total = sum(p.stat().st_size for p in files)
    results = []
    for i, path in enumerate(files):
        tensors = load_file(str(path))
        results.append(([tensors[k] for k in sorted(tensors)], 100 + i))  # the weights aggregate.py gave
    rules = {"fedavg": lambda: aggregate(results), "median": lambda: aggregate_median(results),
             "trimmed_mean": lambda: aggregate_trimmed_avg(results, trim),
             "krum": lambda: aggregate_krum(results, byzantine, 0)}
    if bulyan:  # Flower's Bulyan takes the chosen updates out of the list it is given: a copy each time
        rules["bulyan"] = lambda: aggregate_bulyan(list(results), byzantine, aggregate_krum, to_keep=0)
    out: dict[str, object] = {"version": flwr.__version__}
    for name, rule in rules.items():  # the median of three, as fedsync's FedAvg figure (Krum, Bulyan once: minutes)
        rates = []
        for _ in range(1 if name in ("krum", "bulyan") else 3):
            started = time.perf_counter()
            rule()
            rates.append(total / (time.perf_counter() - started) / 1e9)
        out[name] = statistics.median(rates)
        out[f"{name}_runs"] = rates
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:] == ["bulyan"])
