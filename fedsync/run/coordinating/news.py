"""What a person watching a collecting round is told: each rejection once, as soon as it is decided (those still
waiting for their files, at the close); on a terminal, the round's updates against the quorum in one line; and for
`fedsync status`, the same through the coordinator's lease."""

from __future__ import annotations

from fedsync.base.logs import Log, Logger
from fedsync.run.coordinating.intake import Decision, RoundIntake
from fedsync.storage.lease import Lease


class RoundNews:
    def __init__(self, r: int, log: Log, lease: Lease) -> None:
        self.r, self.log, self.lease = r, log, lease
        self.said: set[str] = set()

    def progress(self, intake: RoundIntake, decision: Decision) -> None:
        """The lease's progress; the deadline's extension, said once; the terminal's line (gone once it closes)."""
        ledger = intake.ledger
        self.lease.progress(sorted(ledger.accepted), decision.target)
        if decision.note:
            self.lease.update("extended", self.r, decision.note, ledger.rejected_records())
            self.log(f"round {self.r}: {decision.note}")
        if isinstance(self.log, Logger):
            remaining = max(0.0, intake.remaining())
            self.log.progress("" if decision.reason else
                              f"round {self.r}: {len(ledger.accepted)} of {decision.target} updates accepted for the "
                              f"quorum, {len(ledger.rejected)} rejected, {remaining:.0f} s to the deadline")

    def rejections(self, intake: RoundIntake, closing: bool = False) -> None:
        ledger = intake.ledger
        shown = [x for x in ledger.rejected_records() if closing or x.worker not in ledger.pending]
        new = [x for x in shown if f"{x.worker}/{x.reason}" not in self.said]
        for x in new:
            self.said.add(f"{x.worker}/{x.reason}")
            self.log(f"round {self.r}: rejected {x.worker} ({x.reason}): {x.detail}")
        for worker, (_, problem) in sorted(ledger.pending.items()):  # not the worker's own (yet): said at once
            said = f"{worker}/{problem.reason.value}/waits"
            if not closing and not problem.reason.syncing and said not in self.said:
                self.said.add(said)
                self.log(f"round {self.r}: {worker}'s update does not count yet ({problem.reason.value}): "
                         f"{problem.detail}; waiting for a marker that does until the round closes")
        if new and not closing:  # `fedsync status` shows them from the lease while the round is open
            self.lease.update(self.lease.record.state, self.r, self.lease.record.note, shown)
