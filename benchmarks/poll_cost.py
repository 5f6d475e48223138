"""CPU cost of watching a share that holds 2,000 files by polling at a 1 s interval, beside watchdog's own
recursive PollingObserver over the same share in the same run. Two layouts: a long run (about 220 rounds of
9 files) and the worst case for fedsync's poller, 2,000 worker registrations in one active folder.

The two do not do the same work, on purpose: fedsync's poller lists only the folders where the protocol is
active (the root, workers/ and the newest three round folders with their updates/), while watchdog's walks
and stats the whole share. In the long-run layout that is most of the difference; in the worst case both
stat all 2,000 files, so that ratio compares like with like. Usage: python benchmarks/poll_cost.py [SECONDS]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

from fedsync.storage.share import Share
from fedsync.storage.watch import ShareWatcher

FILES = 2000


def long_run(root: Path) -> None:
    (root / "workers").mkdir()
    for i in range(3):
        (root / "workers" / f"w{i}.yaml").write_text("x")
    made, r = 3, 1
    while made < FILES:
        updates = root / f"{r:04d}" / "updates"
        updates.mkdir(parents=True)
        for name in ("global.safetensors", "assignment.yaml", "summary.yaml"):
            (updates.parent / name).write_text("x")
        for i in range(3):
            (updates / f"w{i}.safetensors").write_text("x")
            (updates / f"w{i}.yaml").write_text("x")
        made, r = made + 9, r + 1


def many_workers(root: Path) -> None:
    (root / "workers").mkdir()
    for i in range(FILES):
        (root / "workers" / f"w{i}.yaml").write_text("x")


def cpu_share(start, seconds: float) -> float:
    """Percent of one core this process used while `start()`'s watcher ran for `seconds`."""
    stop = start()
    time.sleep(1.5)  # past the first full snapshot
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    used = (time.process_time() - c0) / (time.monotonic() - t0) * 100
    stop()
    return used


def ours(root: Path):
    def start():
        w = ShareWatcher(Share(root), "poll", poll_interval=1.0)
        w.__enter__()
        return lambda: w.__exit__(None, None, None)
    return start


def watchdogs(root: Path):
    def start():
        o = PollingObserver(timeout=1.0)
        o.schedule(FileSystemEventHandler(), str(root), recursive=True)
        o.start()
        return lambda: (o.stop(), o.join())
    return start


def main(seconds: float = 20.0) -> None:
    for label, make in (("long run, ~220 rounds", long_run), ("2,000 registrations in workers/", many_workers)):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make(root)
            count = sum(1 for p in root.rglob("*") if p.is_file())
            a = cpu_share(ours(root), seconds)
            b = cpu_share(watchdogs(root), seconds)
            print(f"{label} ({count} files), 1 s interval: fedsync poller (active folders) {a:.2f} % of a core; "
                  f"watchdog PollingObserver (whole share) {b:.2f} % -> ratio {a / b if b else float('nan'):.2f} "
                  "(goal <= 2 %)")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
