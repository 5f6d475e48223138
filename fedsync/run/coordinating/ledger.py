"""The bookkeeping of a round's updates: which markers were seen, accepted, rejected, still pending (maybe not
synced yet), duplicated or stray, and which updates of closed rounds arrived late. Reads markers; never tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from fedsync.aggregation.candidates import Candidate, Outcome
from fedsync.aggregation.rules import Rule
from fedsync.fedavg import staleness_weight
from fedsync.run.config import RunConfig
from fedsync.run.trust import Trust
from fedsync.storage import names
from fedsync.storage.markers import (
    Accepted,
    Assignment,
    FormatMismatch,
    Late,
    MarkerError,
    PathOutsideFolder,
    Rejected,
    Summary,
    UpdateMarker,
    parse,
)
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.sealing import SCHEME
from fedsync.storage.share import Share
from fedsync.storage.store import LinkRefused
from fedsync.tensors.encoding import ENCODINGS, NONE


@dataclass(frozen=True)
class Bound:
    """The most an update of a round's worker may claim, by what the coordinator knows (PROTOCOL.md section 5.5):
    the examples it trained on (`train`), and those plus the ones it held out for federated evaluation (`total`)."""

    train: int
    total: int
    of: str  # what the bound is, in words: "shard 2 holds 479 examples to train on"


Bounds = Callable[[Assignment, str], Bound]  # (the round's assignment, a worker in it) -> its bound


class RoundLedger:
    """The bookkeeping of one round's updates: which markers were seen, accepted, rejected or still pending."""

    def __init__(self, share: Share, r: int, a: Assignment, bounds: Bounds, rule: Rule, trust: Trust,
                 sealed: bool = False) -> None:
        """`sealed`: the run keeps updates confidential, so each must be sealed to the coordinator (not_sealed)."""
        self.share, self.r, self.a, self.bounds, self.rule, self.trust = share, r, a, bounds, rule, trust
        self.sealed = sealed
        self.accepted: dict[str, UpdateMarker] = {}
        self.rejected: dict[str, Rejected] = {}
        self.pending: dict[str, tuple[tuple[object, ...], Unusable]] = {}
        self.ignored: set[str] = set()
        self.markers: dict[str, UpdateMarker] = {}  # checked markers whose tensors are being verified
        self.signatures: dict[str, tuple[object, ...]] = {}  # files' signatures when last looked at, before reading
        self.duplicates: dict[str, Rejected] = {}
        self.settled: set[str] = set()  # decided in an earlier life of this round (late intake): skipped

    def scan(self) -> list[Candidate]:
        """Markers not decided yet whose files changed since last look, checked up to their tensor file."""
        candidates: list[Candidate] = []
        self._note_strays()
        # The listing's own signatures, not a stat (or, on an object store, a HEAD request) per file: a round of
        # 1,000 workers is scanned at every change.
        listed = {e.name: e.signature for e in self.share.list(self.share.updates_dir(self.r))}
        for name in sorted(listed):
            if names.is_temporary(name):
                continue
            worker = names.marker_owner(name)
            if worker is None:
                if names.is_conflict_copy(name) or not names.is_update_tensors(name):
                    self.ignored.add(names.join(names.UPDATES, name))
                continue  # a tensor file is read through its marker
            if worker in self.settled:
                continue
            signature = (listed.get(name), listed.get(names.update_tensors_name(worker)),
                         listed.get(names.update_tensors_name(worker, sealed=True)))
            if worker in self.accepted or worker in self.rejected:
                if signature != self.signatures[worker] and worker not in self.duplicates:
                    self.duplicates[worker] = Rejected(worker, names.join(names.UPDATES, name), Reason.DUPLICATE.value,
                                                       "its files changed after the update was decided")
                continue
            if worker in self.pending and self.pending[worker][0] == signature:
                continue
            self.signatures[worker] = signature  # taken before reading: a change during the read is retried
            try:
                candidates.append(self._check_marker(worker))
            except Unusable as problem:
                self.settle(worker, problem)
        return candidates

    def _note_strays(self) -> None:
        """Anything in the round folder that the protocol does not put there is reported, never read."""
        for e in self.share.list(self.share.round_dir(self.r)):
            if e.name not in names.ROUND_FILES and not names.is_temporary(e.name):
                self.ignored.add(e.name)

    def _check_marker(self, worker: str) -> Candidate:
        name = self.share.update_marker(self.r, worker)
        short = names.basename(name)
        try:
            data = self.share.read_yaml(name, follow_links=False)
        except LinkRefused:
            raise Unusable(Reason.BAD_PATH, f"{short} is a symbolic link") from None
        except Exception as e:  # noqa: BLE001 - OSError, YAMLError, OversizeError: all 'unreadable'
            raise Unusable(Reason.MARKER_UNREADABLE, f"{short}: {e}") from None
        try:
            m = parse(UpdateMarker, data, short)
        except FormatMismatch as e:
            raise Unusable(Reason.FORMAT_MISMATCH, str(e)) from None
        except PathOutsideFolder as e:
            raise Unusable(Reason.BAD_PATH, str(e)) from None
        except MarkerError as e:
            raise Unusable(Reason.MARKER_INVALID, str(e)) from None
        if worker not in self.a.workers:
            raise Unusable(Reason.NOT_ASSIGNED, f"{worker} has no task in round {self.r}")
        self.trust.check_update(self.a, worker, m, short)  # from here on the marker is the worker's own
        if m.diverged is not None:
            raise Unusable(Reason.DIVERGED, m.diverged)
        if m.tensors is None:
            raise Unusable(Reason.MARKER_INVALID, f"{short} names no tensors and does not say it diverged")
        if m.encryption not in (NONE, SCHEME):
            raise Unusable(Reason.MARKER_INVALID, f"encryption {m.encryption!r} is not {NONE} or {SCHEME}")
        sealed = m.encryption == SCHEME
        if self.sealed and not sealed:
            raise Unusable(Reason.NOT_SEALED, "the run keeps updates confidential, but this one is not sealed to the "
                                              "coordinator (encryption: none): update that worker's fedsync")
        if sealed and not self.sealed:
            raise Unusable(Reason.UNDECRYPTABLE, "sealed, but this run does not seal updates (confidential_updates: "
                                                 "false): the coordinator holds no key for it")
        if m.tensors.file != names.update_tensors_name(worker, sealed):
            raise Unusable(Reason.BAD_PATH, f"{short} names {m.tensors.file!r}")
        bound = self.bounds(self.a, worker)
        if not 0 < m.samples <= bound.train:
            raise Unusable(Reason.BAD_SAMPLES, f"samples={m.samples}, but {bound.of}")
        if m.steps < 1:
            raise Unusable(Reason.BAD_SAMPLES, f"steps={m.steps}: an update comes from at least one step")
        if m.evaluation is not None and m.samples + m.evaluation.samples > bound.total:
            raise Unusable(Reason.BAD_SAMPLES, f"samples={m.samples} trained and {m.evaluation.samples} held out, "
                                               f"but {bound.of} ({bound.total} with those held out)")
        if m.encoding not in ENCODINGS:
            raise Unusable(Reason.BAD_ENCODING, f"encoding {m.encoding!r} is not one of {', '.join(ENCODINGS)}")
        self.markers[worker] = m
        return Candidate(worker, self.share.update_tensors(self.r, worker, sealed), m.tensors,
                         self.rule.weight(m.samples, m.steps), self.r, m.steps, m.encoding, sealed,
                         m.sealed_head if sealed else None)

    def recheck(self) -> None:
        """Look again at every update still waiting, although its files did not change: the trusted keys did."""
        self.pending.clear()

    def record(self, outcomes: list[Outcome]) -> None:
        """Apply the intake's verdicts; a later verdict on the same worker (a lane rebuild) overrides."""
        for o in outcomes:
            worker = o.candidate.worker
            if o.problem is None:
                self.accepted[worker] = self.markers[worker]
                self.pending.pop(worker, None)
            else:
                self.accepted.pop(worker, None)
                self.settle(worker, o.problem)

    def settle(self, worker: str, problem: Unusable) -> None:
        """A problem that may be an unsynced copy waits for the files to change; any other is a rejection."""
        if problem.reason.waits:
            self.pending[worker] = (self.signatures[worker], problem)  # retried on change, rejected at close
        else:
            self.pending.pop(worker, None)
            self.rejected[worker] = Rejected(worker, names.update_marker_in_round(worker), problem.reason.value,
                                             problem.detail)

    def all_reported(self) -> bool:
        return all(w in self.accepted or w in self.rejected for w in self.a.workers)

    def accepted_records(self, norms: dict[str, float], clipped: set[str]) -> list[Accepted]:
        """The accepted updates for summary.yaml, with the norms they were read with and whether they were clipped."""
        return [Accepted(worker=w, samples=m.samples, steps=m.steps,
                         weight=round(self.rule.weight(m.samples, m.steps), 6),
                         train_loss=m.train_loss, seconds=m.seconds, device=m.device,
                         norm=round(norms[w], 6) if w in norms else None, clipped=w in clipped,
                         evaluation=m.evaluation, bytes=m.tensors.bytes if m.tensors else None,
                         train_s=(m.timings or {}).get("train_s"))
                for w, m in sorted(self.accepted.items())]

    def rejected_records(self) -> list[Rejected]:
        late = [Rejected(w, names.update_marker_in_round(w), p.reason.value, f"still at the close: {p.detail}")
                for w, (_, p) in sorted(self.pending.items())]
        duplicates = [d for w, d in self.duplicates.items() if w not in self.rejected]  # said once
        return sorted([*self.rejected.values(), *duplicates], key=lambda x: x.worker) + late

    def missing(self) -> list[str]:
        reported = set(self.accepted) | set(self.rejected) | set(self.pending)
        return sorted(set(self.a.workers) - reported)


class LateLedger:
    """Updates for closed rounds (at most max_staleness back) that arrived after their round closed."""

    def __init__(self, share: Share, r: int, cfg: RunConfig, bounds: Bounds, rule: Rule, trust: Trust) -> None:
        self.r, self.cfg = r, cfg
        self.rounds: dict[int, RoundLedger] = {}
        self.found: dict[tuple[int, str], Late] = {}
        window = range(max(1, r - cfg.max_staleness), r)
        summaries = {c: load_summary(share, c) for c in window if share.exists(share.summary(c))}
        for c, s in summaries.items():
            a = share.read_record(Assignment, share.assignment(c))
            ri = RoundLedger(share, c, a, bounds, rule, trust, cfg.confidential_updates)
            ri.settled = {x.worker for x in s.accepted} | {x.worker for x in s.rejected}
            self.rounds[c] = ri
        for s in summaries.values():  # recorded as late by an earlier round: decided, never again
            for x in s.late:
                if x.round in self.rounds:
                    self.rounds[x.round].settled.add(x.worker)

    def scan(self) -> list[Candidate]:
        """Late updates to read (fold), after recording those dropped or rejected by their markers."""
        out: list[Candidate] = []
        for c, ri in self.rounds.items():
            for cand in ri.scan():
                if self.cfg.late_policy == "drop":
                    self._decide(ri, Late(cand.worker, c, "dropped", 0.0, "late_policy is drop"))
                else:
                    weight = staleness_weight(cand.weight, self.r - c, self.cfg.staleness_exponent)
                    out.append(replace(cand, weight=weight))
            for w, rej in list(ri.rejected.items()):
                self._decide(ri, Late(w, c, "rejected", 0.0, f"{rej.reason}: {rej.detail}"))
                del ri.rejected[w]
        return out

    def recheck(self) -> None:
        for ri in self.rounds.values():
            ri.recheck()

    def record(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            c, ri = o.candidate.round, self.rounds[o.candidate.round]
            if o.problem is None:
                self._decide(ri, Late(o.candidate.worker, c, "folded", round(o.candidate.weight, 6),
                                      f"{self.r - c} round(s) late"))
            elif o.problem.reason.waits:
                self.found.pop((c, o.candidate.worker), None)  # retried, in this round or the next
                ri.settled.discard(o.candidate.worker)
                ri.settle(o.candidate.worker, o.problem)
            else:
                self._decide(ri, Late(o.candidate.worker, c, "rejected", 0.0,
                                      f"{o.problem.reason.value}: {o.problem.detail}"))

    def _decide(self, ri: RoundLedger, late: Late) -> None:
        self.found[(late.round, late.worker)] = late
        ri.settled.add(late.worker)

    def records(self) -> list[Late]:
        return [self.found[k] for k in sorted(self.found)]


def load_summary(share: Share, r: int) -> Summary:
    return share.read_record(Summary, share.summary(r))
