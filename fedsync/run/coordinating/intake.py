"""A round's intake, from markers to the round's aggregate: one object owns the open round's ledger, the ledger of
late updates and the aggregator, so each verdict goes straight to the book that keeps it. The coordinator's
collecting loop only asks it to scan, take, decide and aggregate, then closes the round with what it returns.

Screening and clipping act on what was added (fedsync/aggregation/defence.py); the closing
rules (quorum, all reported, deadline) are judged by the coordinator's clock (docs/DESIGN.md, invariant 5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedsync.aggregation.candidates import Candidate, Outcome
from fedsync.aggregation.defence import at_close, on_arrival, spoiled
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.optimizers import ServerOptimizer
from fedsync.aggregation.privacy.noise import fresh_rng, noisy_fraction_under
from fedsync.aggregation.rules import Rule
from fedsync.aggregation.validity import validity_of
from fedsync.base.errors import RunStuck
from fedsync.base.logs import Log
from fedsync.fedavg import l2_norm
from fedsync.run.config import RunConfig
from fedsync.run.coordinating.budget import RoundPrivacy
from fedsync.run.coordinating.ledger import Bounds, LateLedger, RoundLedger
from fedsync.run.trust import Trust
from fedsync.storage.markers import Accepted, Assignment, Late, Rejected
from fedsync.storage.reasons import Reason
from fedsync.storage.sealing import SealingIdentity
from fedsync.storage.share import Share
from fedsync.tensors.files import layout_of

Tensors = dict[str, torch.Tensor]
DIVERGED = {Reason.NON_FINITE.value, Reason.NORM_OUTLIER.value, Reason.SPOILS_AGGREGATE.value, Reason.DIVERGED.value}


def quorum_target(quorum: int | float, live_assigned: int, min_updates: int) -> int:
    """Accepted updates needed to close early: a count, or a fraction of the live assigned workers."""
    wanted = min(quorum, live_assigned) if isinstance(quorum, int) else math.ceil(quorum * live_assigned)
    return max(min_updates, wanted)


@dataclass
class Decision:
    """Whether the round closes now (`reason`: quorum, all_reported, deadline; empty: not yet), the quorum target,
    and a note to say once when the deadline passed with too few updates."""

    reason: str
    target: int
    note: str = ""


@dataclass
class Closing:
    """Everything a round closes with (Coordinator._close writes it): the new global model, the optimizer's state,
    and the decisions for summary.yaml."""

    round: int
    reason: str
    new_state: Tensors
    server_state: Tensors
    step_scale: float
    accepted: list[Accepted]
    rejected: list[Rejected]
    missing: list[str]
    ignored: list[str]
    late: list[Late]
    seconds: float
    timings: dict[str, float]
    clipped: dict[str, float] = field(default_factory=dict)  # worker -> the L2 norm it was clipped from
    noise_multiplier: float | None = None  # dp: the released sum's noise over the bound, when not the plan's
    fraction_under: float | None = None    # dp, adaptive clipping: the noised fraction of updates within the bound


class RoundIntake:
    """Round `r`'s updates and the late ones of the `max_staleness` rounds before it, taken in as their markers
    appear."""

    def __init__(self, share: Share, r: int, a: Assignment, state: Tensors, cfg: RunConfig, bounds: Bounds,
                 rule: Rule, trust: Trust, log: Log, buffers: Mapping[str, str],
                 probe: Callable[[Tensors], float] | None = None, opener: SealingIdentity | None = None,
                 privacy: RoundPrivacy | None = None) -> None:
        """`buffers`: the model's constrained buffers (fedsync/learning/models.py, constrained_buffers); `probe`:
        a new model's loss on a few held-out examples (fedsync/run/coordinating/evaluation.py, Probe); `opener`: the
        key that opens sealed updates (confidential_updates); `privacy`: the round's dp mechanism (its bound clips
        every update; no update's norm or clipping goes into the summary)."""
        self.probe = probe
        self.r, self.a, self.cfg, self.rule, self.log = r, a, cfg, rule, log
        self.opened = time.monotonic()
        self.ledger = RoundLedger(share, r, a, bounds, rule, trust, cfg.confidential_updates)
        self.late = LateLedger(share, r, cfg, bounds, rule, trust)
        self.validity = validity_of(buffers, state)
        self.aggregator = Aggregator(layout_of(state), share.store, round=r, validity=self.validity, opener=opener)
        self.model_norm = l2_norm(state)
        self.privacy = privacy
        self.screens = cfg.screens(privacy.clip if privacy is not None else None)
        self.extended = False  # the deadline passed with fewer than min_updates: said once
        self.timings = {"final_intake_s": 0.0, "aggregate_s": 0.0, "evaluate_s": 0.0}

    def elapsed(self) -> float:
        return time.monotonic() - self.opened

    def remaining(self) -> float:
        """Seconds to the round's deadline by this process's clock (negative once it passed)."""
        return self.a.time_budget_s - self.elapsed()

    def scan(self) -> list[Candidate]:
        """Markers not decided yet whose files changed since the last look: this round's, then late ones."""
        return self.ledger.scan() + self.late.scan()

    def recheck(self) -> None:
        """Judge every waiting update again although its files did not change: the trusted keys did."""
        self.ledger.recheck()
        self.late.recheck()

    def take(self, candidates: list[Candidate]) -> None:
        """Verify and add each candidate (one read of each file), then screen and clip what was added."""
        t = time.perf_counter()
        self._record(self.aggregator.take(candidates))
        self._record(on_arrival(self.aggregator, self.screens, self.model_norm))
        self.timings["final_intake_s"] = time.perf_counter() - t

    def _record(self, outcomes: list[Outcome]) -> None:
        self.ledger.record([o for o in outcomes if o.candidate.round == self.r])
        self.late.record([o for o in outcomes if o.candidate.round != self.r])

    def decide(self, live: set[str], ruin: Callable[[], str] = str) -> Decision:
        """The closing rules, in order: the quorum, every assigned worker reported, the deadline. Raises RunStuck
        when every live assigned worker's update was rejected; `ruin` says then whether updates accepted in earlier
        rounds ruined the model (fedsync/run/coordinating/verdicts.py), "" when they did not."""
        accepted = len(self.ledger.accepted)
        live_assigned = [w for w in self.a.workers if w in live]
        target = quorum_target(self.cfg.quorum, len(live_assigned), self.cfg.min_updates)
        enough = accepted >= self.cfg.min_updates
        late = self.remaining() <= 0
        if accepted >= target:
            return Decision("quorum", target)
        if enough and self.ledger.all_reported():
            return Decision("all_reported", target)
        if late and enough:
            return Decision("deadline", target)
        if live_assigned and all(w in self.ledger.rejected for w in live_assigned):
            raise RunStuck(self._stuck(live_assigned, ruin()))
        if late and not self.extended:
            self.extended = True
            return Decision("", target, f"deadline passed with {accepted} accepted update(s), fewer than "
                                        f"min_updates={self.cfg.min_updates}; the round stays open until enough arrive")
        return Decision("", target)

    def _stuck(self, workers: list[str], ruin: str) -> str:
        rejected = self.ledger.rejected
        why = "; ".join(f"{w}: {rejected[w].reason} ({rejected[w].detail})" for w in workers)
        if ruin:
            advice = (f"{ruin}; honest updates are rejected against that model. Take an earlier round's model "
                      "(`fedsync export --round N`) into a new share, and revoke the workers that poisoned it "
                      "(`fedsync trust NAME --revoke`)")
        elif any(rejected[w].reason in DIVERGED for w in workers):
            advice = ("every worker's training diverges or its update is far too large, and the model was fine "
                      "before: start a new share with a lower lr (--set lr=...)")
        else:
            advice = "fix what the reasons name on those workers, then start this coordinator again"
        return f"round {self.r} cannot close: every live assigned worker's update was rejected ({why}); {advice}"

    def aggregate(self, reason: str, state: Tensors, optimizer: ServerOptimizer,
                  server_state: Tensors) -> Closing | None:
        """The next global model from what was taken in, after the close's screens (fedsync/aggregation/defence.py).
        None when updates were rejected on the way (pointing away from the round's consensus, or spoiling the new
        model): the closing rules are judged again without them."""
        t = time.perf_counter()
        trained = {k: state[k].numel() for k in sorted(optimizer.parameters) if state[k].is_floating_point()}
        outcomes, rejected = at_close(self.aggregator, self.screens, trained)
        self._record(outcomes)
        if rejected:
            return None
        result = self.rule.aggregate(self.aggregator.collected(optimizer.parameters))
        on_time = None  # late updates move the model once; the optimizer's state learns without them
        if optimizer.stateful and self.aggregator.has_late:
            on_time = self.rule.aggregate(self.aggregator.collected(optimizer.parameters, late=False)).delta
        new_state, new_server_state = optimizer.step(state, result.delta, server_state, on_time)
        self.timings["aggregate_s"] = time.perf_counter() - t
        outcomes, why = spoiled(self.aggregator, new_state, self.validity, self.probe)
        if why:
            self._record(outcomes)
            self.log(f"round {self.r}: {why}")
            return None
        norms = {c.worker: n for c, n in self.aggregator.norms.items() if c.round == self.r}
        clipped = {c.worker: norms[c.worker] for c in self.aggregator.scales if c.round == self.r}
        under = None
        if self.privacy is not None:
            if self.privacy.count_std is not None:
                under = noisy_fraction_under(list(norms.values()), self.privacy.clip, self.privacy.denominator,
                                             self.privacy.count_std, fresh_rng())
            norms, clipped = {}, {}  # each update's norm tells about its worker's data: not published
        return Closing(self.r, reason, new_state, new_server_state, result.step_scale,
                       self.ledger.accepted_records(norms, set(clipped)), self.ledger.rejected_records(),
                       self.ledger.missing(), sorted(self.ledger.ignored), self.late.records(), self.elapsed(),
                       dict(self.timings), clipped, fraction_under=under)

    def close(self) -> None:
        self.aggregator.close()
