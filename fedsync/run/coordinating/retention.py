"""keep_rounds: the coordinator removes the tensors (global model, updates, optimizer state) of rounds more than
keep_rounds closed rounds back; their markers, summaries and evaluations stay (docs/PROTOCOL.md section 5.11)."""

from __future__ import annotations

from fedsync.storage import names
from fedsync.storage.share import Share


class Retention:
    def __init__(self, share: Share, keep_rounds: int | None) -> None:
        self.share, self.keep = share, keep_rounds
        self.pruned = 0  # rounds up to this one have had their tensors removed by this process

    def prune(self, last_closed: int) -> None:
        """Remove what keep_rounds lets go of. A round's aggregate is the next round's global model, so it goes one
        round later. Idempotent: a restart finishes what a crash cut short."""
        if self.keep is None:
            return
        for p in self.share.rounds():
            if p > last_closed - self.keep:
                break
            if p <= self.pruned:
                continue
            updates = self.share.updates_dir(p)
            for e in self.share.list(updates):
                if names.is_update_tensors(e.name):
                    self.share.remove(names.join(updates, e.name))
            self.share.remove(self.share.global_model(p))
            # never the last closed round's optimizer state, which the run goes on from: keep_rounds >= 2
            self.share.remove(self.share.server_state(p))
            self.pruned = p
