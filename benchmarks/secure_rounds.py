"""A secure-aggregation round against a plain one: a real coordinator process and 5, 20 and 100 simulated workers
on a local share, digits_cnn (0.15 M parameters).

The workers are one thread of this process that does what their files say: each registers with its own key and,
for each round, writes a signed update at once (plain run), or takes every secure-aggregation step with fedsync's
own worker code (fedsync/run/working/secure.py: keys, envelopes, the masked input of a random delta, revealed
shares) as soon as the coordinator's roster allows. They train nothing, so the round time (summary.yaml's
`seconds`, from the round's opening to its close, median of rounds 2..) is the protocol's own cost. Also printed:
the bytes each worker writes per round, against the plain update's.

Usage: python benchmarks/secure_rounds.py [ROUNDS] [N ...]   (default 3 rounds; 5 20 100 workers)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale_workers import Fleet as PlainFleet  # noqa: E402  (benchmarks/ is this script's folder)

from fedsync.learning.models import build_model  # noqa: E402
from fedsync.run.working.secure import SecureWorker  # noqa: E402
from fedsync.storage import names  # noqa: E402
from fedsync.storage.manifest import read_manifest  # noqa: E402
from fedsync.storage.markers import (  # noqa: E402
    FORMAT_VERSION,
    Assignment,
    Summary,
    UpdateMarker,
    parse,
    to_dict,
)
from fedsync.storage.share import Share  # noqa: E402
from fedsync.storage.signing import update_message  # noqa: E402
from fedsync.tensors.files import layout_of, save_state  # noqa: E402

FEDSYNC = [sys.executable, "-m", "fedsync"]
SAMPLES = 10  # what each simulated worker claims: within the smallest shard at 100 workers (14 examples)


class Fleet(PlainFleet):
    """benchmarks/scale_workers.py's simulated workers (registration, heartbeats), answering plainly or securely."""

    def __init__(self, share: Share, n: int, keys: Path, secure: bool) -> None:
        super().__init__(share, n, keys, "digits_cnn", 0.0)
        self.secure = secure
        model = build_model("digits_cnn", 10).state_dict()
        self.layout = layout_of(model)
        self.delta = {k: (torch.randn(v.shape) * 1e-2).to(v.dtype) if v.is_floating_point() else
                      torch.zeros_like(v) for k, v in model.items()}
        self.written: dict[str, int] = {}  # bytes each worker wrote in the last round it finished

    def answer(self, rounds: int) -> None:
        manifest = read_manifest(self.share)
        secure = {w: SecureWorker(self.share, manifest.run_id, w, i, manifest.coordinator_key, lambda _: None)
                  for w, i in self.ids.items()}
        for r in range(1, rounds + 1):
            while not self.share.exists(self.share.assignment(r)):
                if self.stop.wait(0.01):
                    return
            a = parse(Assignment, self.share.read_yaml(self.share.assignment(r)), "assignment")
            left = set(a.workers)
            while left and not self.share.exists(self.share.summary(r)):
                progressed = False
                for w in sorted(left):
                    if self.secure:
                        progressed |= secure[w].advance(r, a)
                        if self.share.exists(names.secagg_reveal(r, w)):
                            left.discard(w)
                        if secure[w].may_train(r) and not self.share.exists(self.share.update_marker(r, w)):
                            masked, _ = secure[w].masked_input(r, a, self.delta, self.layout, SAMPLES)
                            self._submit(r, a, w, masked, "secagg")
                            progressed = True
                    else:
                        self._submit(r, a, w, self.delta, "none")
                        left.discard(w)
                if not progressed and self.stop.wait(0.01):
                    return
            if self.secure:
                folder = self.share.path(names.round_dir(r))
                for w in a.workers:
                    self.written[w] = sum(p.stat().st_size for p in folder.rglob(f"{w}.*") if p.is_file())

    def _submit(self, r: int, a: Assignment, w: str, tensors: dict[str, torch.Tensor], encoding: str) -> None:
        ref = save_state(self.share.write, self.share.update_tensors(r, w), tensors)
        m = UpdateMarker(format=FORMAT_VERSION, round=r, worker=w, base=a.model.blake3, tensors=ref, samples=SAMPLES,
                         steps=1, train_loss=1.0, seconds=0.1, device="cpu", encoding=encoding)
        m.signature = self.ids[w].sign(update_message(a.run_id, m))
        self.share.write_yaml(self.share.update_marker(r, w), to_dict(m))
        if not self.secure:
            self.written[w] = ref.bytes + len(self.share.store.read(self.share.update_marker(r, w), 1 << 20))


def measure(n: int, rounds: int, secure: bool) -> tuple[float, float]:
    """(median round seconds over rounds 2.., bytes one worker writes per round)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        share = Share(t / "share")
        (t / "share").mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDSYNC_KEY_DIR": str(t / "coordinator-keys")}
        sets = ["--set", f"min_workers={n}", "--set", "worker_timeout=600", "--set", "round_timeout=600",
                "--set", f"eval_every={rounds}", "--set", "eval_samples=64", "--set", "confidential_updates=false",
                "--set", "clip_norm=5", "--set", f"secure_aggregation={str(secure).lower()}"]
        coord = subprocess.Popen(FEDSYNC + ["coordinator", "--share", str(share.root), "--rounds", str(rounds), *sets],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not share.exists(share.manifest):
            if coord.poll() is not None:
                raise SystemExit(f"the coordinator exited {coord.returncode}: {coord.stderr.read()}")
            time.sleep(0.05)
        fleet = Fleet(share, n, t / "worker-keys", secure)
        fleet.register()
        threading.Thread(target=fleet.heartbeats, daemon=True).start()  # every 5 s
        answering = threading.Thread(target=fleet.answer, args=(rounds,), daemon=True)
        answering.start()
        _, err = coord.communicate(timeout=1800)
        fleet.stop.set()
        if coord.returncode != 0:
            raise SystemExit(f"the coordinator with {n} workers exited {coord.returncode}: {err[-2000:]}")
        summaries = [parse(Summary, share.read_yaml(share.summary(r)), "s") for r in range(1, rounds + 1)]
        assert all(len(s.accepted) == n for s in summaries), [s.closed_because for s in summaries]
        return statistics.median(s.seconds for s in summaries[1:]), statistics.median(fleet.written.values())


def main(rounds: int, sizes: list[int]) -> None:
    print(f"digits_cnn, {rounds} rounds, simulated workers that train nothing")
    print("| workers | plain round | secure round | ratio | bytes a worker writes, plain / secure |")
    print("|---|---|---|---|---|")
    for n in sizes:
        plain, plain_bytes = measure(n, rounds, secure=False)
        secure, secure_bytes = measure(n, rounds, secure=True)
        print(f"| {n} | {plain:.2f} s | {secure:.2f} s | {secure / plain:.1f}x | {plain_bytes / 1e3:.0f} kB / "
              f"{secure_bytes / 1e3:.0f} kB ({secure_bytes / plain_bytes:.2f}x) |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, [int(a) for a in sys.argv[2:]] or [5, 20, 100])
