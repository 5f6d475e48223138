"""Round time over a real Syncthing pair (127.0.0.1, fsWatcherDelayS=1, the settings scripts/setup_syncthing.md
recommends) against the same run on one local share, measured in the same run: digits, 2 workers, one of them
on the far copy. Prints the median round time (rounds 2.., from summary.yaml) of each and the time added.
Usage: python benchmarks/syncthing_rounds.py [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the Syncthing harness

from fedsync.markers import Summary, parse  # noqa: E402
from fedsync.share import Share, read_yaml  # noqa: E402
from tests.syncthing import SyncthingPair  # noqa: E402

FEDSYNC = [sys.executable, "-m", "fedsync"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(coord_share: Path, worker_shares: list[Path], rounds: int, apis: dict[Path, list[str]] | None = None
        ) -> list[float]:
    """A whole run; `apis` maps a share copy to the --syncthing options of the processes using it."""
    def extra(share: Path) -> list[str]:
        return (apis or {}).get(share, [])

    procs = [subprocess.Popen(FEDSYNC + ["coordinator", "--share", str(coord_share), "--rounds", str(rounds),
                                         "--set", "min_workers=2", *extra(coord_share)],
                              env=ENV, stdout=subprocess.DEVNULL)]
    procs += [subprocess.Popen(FEDSYNC + ["worker", "--share", str(s), "--name", f"w{i}", "--device", "cpu",
                                          "--wait-for-run", "120", *extra(s)], env=ENV, stdout=subprocess.DEVNULL)
              for i, s in enumerate(worker_shares, 1)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"{p.args[3]} failed")
    share = Share(coord_share)
    return [parse(Summary, read_yaml(share.summary(r)), "s").seconds for r in range(2, rounds + 1)]


def main(rounds: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "local").mkdir()
        local = run(t / "local", [t / "local", t / "local"], rounds)
        a, b = t / "A", t / "B"
        with SyncthingPair(t, a, b) as pair:
            synced = run(a, [a, b], rounds)
        a2, b2 = t / "A2", t / "B2"
        with SyncthingPair(t / "nudged", a2, b2) as pair:
            apis = {copy: inst.fedsync_args() for copy, inst in zip((a2, b2), pair.instances)}
            nudged = run(a2, [a2, b2], rounds, apis)
    lm, sm, nm = statistics.median(local), statistics.median(synced), statistics.median(nudged)
    print(f"round time, digits, 2 workers (one on the far copy), rounds 2..{rounds}, medians:")
    print(f"  local share: {lm:.2f} s")
    print(f"  Syncthing, its watcher alone (fsWatcherDelayS=1): {sm:.2f} s -> {sm - lm:.2f} s added per round")
    print(f"  Syncthing nudged by fedsync (--syncthing): {nm:.2f} s -> {nm - lm:.2f} s added per round "
          f"(goal <= 2 s); ratio to local {nm / lm:.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
