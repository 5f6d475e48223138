"""Round time over a real Syncthing pair (127.0.0.1) against the same run on one local share, measured in the
same run: digits, 2 workers, one of them on the far copy. Three Syncthing settings: its default watcher delay
(fsWatcherDelayS=10, fewer rounds: each takes about 20 s), the 1 s that scripts/setup_syncthing.md recommends,
and 1 s with fedsync's --syncthing scan nudges. Prints the median round time (rounds 2.., from summary.yaml)
of each and the time it adds to the local share's. Usage: python benchmarks/syncthing_rounds.py [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the Syncthing harness

from fedsync.storage.markers import Summary, parse  # noqa: E402
from fedsync.storage.share import Share
from tests.syncthing import SyncthingPair  # noqa: E402

FEDSYNC = [sys.executable, "-m", "fedsync"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEFAULT_DELAY_ROUNDS = 4  # rounds of the run with Syncthing's default watcher delay (about 20 s each)


def run(coord_share: Path | str, worker_shares: list[Path] | list[str], rounds: int,
        apis: dict[Path, list[str]] | None = None, settings: tuple[str, ...] = (),
        env: dict[str, str] | None = None) -> list[float]:
    """A whole run; `apis` maps a share copy to the --syncthing options of the processes using it; `settings` are
    more coordinator options (--config, --set); `env` more variables (an object store's endpoint)."""
    environ = {**ENV, **(env or {})}
    def extra(share: Path | str) -> list[str]:
        return (apis or {}).get(share, [])  # type: ignore[call-overload]

    procs = [subprocess.Popen(FEDSYNC + ["coordinator", "--share", str(coord_share), "--rounds", str(rounds),
                                         "--set", "min_workers=2", *settings, *extra(coord_share)],
                              env=environ, stdout=subprocess.DEVNULL)]
    procs += [subprocess.Popen(FEDSYNC + ["worker", "--share", str(s), "--name", f"w{i}", "--device", "cpu",
                                          "--wait-for-run", "120", *extra(s)], env=environ, stdout=subprocess.DEVNULL)
              for i, s in enumerate(worker_shares, 1)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"{p.args[3]} failed")
    share = Share(coord_share)  # type: ignore[arg-type]
    return [parse(Summary, share.read_yaml(share.summary(r)), "s").seconds for r in range(2, rounds + 1)]


def main(rounds: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "local").mkdir()
        local = run(t / "local", [t / "local", t / "local"], rounds)
        a0, b0 = t / "A0", t / "B0"
        with SyncthingPair(t / "default", a0, b0, watcher_delay_s=10):
            default = run(a0, [a0, b0], min(rounds, DEFAULT_DELAY_ROUNDS))
        a, b = t / "A", t / "B"
        with SyncthingPair(t, a, b):
            synced = run(a, [a, b], rounds)
        a2, b2 = t / "A2", t / "B2"
        with SyncthingPair(t / "nudged", a2, b2) as pair:
            apis = {copy: inst.fedsync_args() for copy, inst in zip((a2, b2), pair.instances)}
            nudged = run(a2, [a2, b2], rounds, apis)
    lm, sm, nm = statistics.median(local), statistics.median(synced), statistics.median(nudged)
    dm = statistics.median(default)
    print(f"round time, digits, 2 workers (one on the far copy), rounds 2..{rounds}, medians:")
    print(f"  local share: {lm:.2f} s")
    print(f"  Syncthing, its default watcher (fsWatcherDelayS=10, rounds 2..{min(rounds, DEFAULT_DELAY_ROUNDS)}): "
          f"{dm:.2f} s -> {dm - lm:.2f} s added per round")
    print(f"  Syncthing, its watcher alone (fsWatcherDelayS=1): {sm:.2f} s -> {sm - lm:.2f} s added per round")
    print(f"  Syncthing nudged by fedsync (--syncthing): {nm:.2f} s -> {nm - lm:.2f} s added per round "
          f"(goal <= 2 s); ratio to local {nm / lm:.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
