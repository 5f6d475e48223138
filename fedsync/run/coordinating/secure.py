"""A secure-aggregation round on the coordinator (docs/PROTOCOL.md section 5.16): after each of the workers' steps,
a roster naming who is still in; then the sum of the survivors' masked inputs, unmasked with the shares they
reveal. The coordinator never holds one worker's update: only masked inputs, and at the end their sum.

Each roster is written once; a restarted coordinator reads the rosters back and continues at the first step
without one (the masked inputs are summed again from their files). A step whose deadline passes with too few
workers redoes the round: the summary says why, and the next round starts from the same model.
"""

from __future__ import annotations

import base64
import binascii
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load

from fedsync.aggregation.optimizers import ServerOptimizer
from fedsync.aggregation.privacy.noise import add_gaussian_, fresh_generator
from fedsync.aggregation.secagg import shamir
from fedsync.aggregation.secagg.envelope import public_key
from fedsync.aggregation.secagg.rounds import PAIR, SELF, Round, add_masks, masks_to_remove
from fedsync.aggregation.secagg.vector import length, unflatten
from fedsync.base.faults import crash_point
from fedsync.base.logs import Log
from fedsync.base.machine import cores
from fedsync.run.config import RunConfig
from fedsync.run.coordinating.budget import RoundPrivacy
from fedsync.run.coordinating.intake import Closing, quorum_target
from fedsync.run.coordinating.ledger import Bounds
from fedsync.run.secure import ENCODING, MASKED, SLICE, encoding, publics, read_roster, round_of
from fedsync.run.trust import Trust
from fedsync.storage import names
from fedsync.storage.keys import Identity
from fedsync.storage.markers import FORMAT_VERSION, Accepted, Assignment, MarkerError, Rejected, UpdateMarker, to_dict
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.secagg_files import (
    SecaggKeys,
    SecaggReveal,
    SecaggRoster,
    SecaggShares,
    keys_message,
    reveal_message,
    roster_message,
    shares_message,
)
from fedsync.storage.share import Share
from fedsync.storage.signing import verify
from fedsync.tensors.files import layout_of

Tensors = dict[str, torch.Tensor]
STEPS = ("keys", "envelopes", "masked input", "revealed shares")
PHASE_S = 30.0  # the longest a step other than training waits for late workers (a quarter of round_timeout if less)


@dataclass
class _Step:
    """What one step has gathered: each worker's usable file (or its problem), and when the step began."""

    began: float
    found: dict[str, object] = field(default_factory=dict)
    problems: dict[str, Unusable] = field(default_factory=dict)


class SecureRound:
    def __init__(self, share: Share, r: int, a: Assignment, state: Tensors, cfg: RunConfig, bounds: Bounds,
                 trust: Trust, identity: Identity, log: Log, privacy: RoundPrivacy | None = None) -> None:
        """`privacy`: the round's dp mechanism (every update weighs 1; the mean divides by the workers assigned)."""
        self.share, self.r, self.a, self.state, self.cfg = share, r, a, state, cfg
        self.privacy = privacy
        self.bounds, self.trust, self.identity, self.log = bounds, trust, identity, log
        self.layout = layout_of(state)
        self.opened = time.monotonic()
        self.phase_s = min(PHASE_S, cfg.round_timeout / 4)
        self.rosters: dict[int, SecaggRoster] = {}
        for step in (1, 2, 3):  # a restarted coordinator: the steps it closed already
            roster = read_roster(share, a.run_id, r, step, identity.public)
            if roster is None:
                break
            self.rosters[step] = roster
        self.step = _Step(time.monotonic())
        self.markers: dict[str, UpdateMarker] = {}  # the masked inputs summed into `total`
        self.total: np.ndarray | None = None
        self.dropped: dict[str, Unusable] = {}  # who left the round at a closed step, and why
        for step, roster in self.rosters.items():  # the steps a restarted coordinator finds closed
            before = self.rosters[step - 1].workers if step > 1 else []
            for w in sorted(set(before) - set(roster.workers)):
                self.dropped[w] = Unusable(Reason.SECURE_STEP, f"{w} is not in roster {step}: it did not send its "
                                                               f"{STEPS[step - 1]} in time")
        self.why = "all_reported"  # how step 3 closed: all_reported, quorum or deadline
        self._fixed: Round | None = None  # the graph over roster 1's workers, once it is written

    @property
    def current(self) -> int:
        """The step being collected: 1 keys, 2 envelopes, 3 masked inputs, 4 revealed shares."""
        return len(self.rosters) + 1

    def remaining(self) -> float:
        deadline = self.a.time_budget_s if self.current == 3 else self.phase_s
        began = self.opened if self.current == 3 else self.step.began
        return deadline - (time.monotonic() - began)

    def advance(self, live: set[str], optimizer: ServerOptimizer, server_state: Tensors) -> Closing | None:
        """Look at the current step's files; close the step when everyone expected answered or its deadline passed.
        The round's Closing once it is aggregated or must be redone; None while it goes on."""
        expected = self._expected(live)
        check: Callable[[str], object] = [self._keys, self._envelopes, self._masked, self._reveal][self.current - 1]
        for w in expected:
            if w in self.step.found:
                continue
            try:
                self.step.found[w] = check(w)
                self.step.problems.pop(w, None)
            except Unusable as e:
                self.step.problems[w] = e
        answered = set(self.step.found) | {w for w, p in self.step.problems.items() if not p.reason.waits}
        if self.current == 4:
            return self._try_unmask(optimizer, server_state)
        quorum = self.current == 3 and len(self.step.found) >= quorum_target(self.cfg.quorum, len(expected),
                                                                             self.cfg.min_updates)
        if not (answered >= expected or quorum) and self.remaining() > 0:
            return None
        if self.current == 3:
            self.why = "all_reported" if answered >= expected else "quorum" if quorum else "deadline"
        return self._close_step(server_state)

    def _expected(self, live: set[str]) -> set[str]:
        """Who the current step waits for: those the last roster named (step 1: the assigned), while they are live;
        one that went away is not waited for until the deadline."""
        named = self.a.workers if self.current == 1 else self.rosters[min(self.current - 1, 3)].workers
        return {w for w in named if w in live}

    def _close_step(self, server_state: Tensors) -> Closing | None:
        step, workers = self.current, sorted(self.step.found)
        if step > 1:  # named in the last roster, gone since: it left the round at this step
            for w in set(self.rosters[step - 1].workers) - set(workers) - set(self.step.problems):
                self.step.problems[w] = Unusable(Reason.SECURE_STEP, f"{w} left the round before sending its "
                                                                     f"{STEPS[step - 1]} (no longer live)")
        if len(workers) < self.cfg.min_updates:
            return self._redo(f"only {len(workers)} worker(s) sent their {STEPS[step - 1]} by the deadline, "
                              f"{self.cfg.min_updates} needed (min_updates)", server_state)
        first = self.rosters.get(1)
        keys = {w: f"{self.step.found[w].c_key} {self.step.found[w].s_key}" for w in workers} if step == 1 else {}
        max_weight = max(self.bounds(self.a, w).train for w in workers) if step == 1 else first.max_weight
        if self.privacy is not None:
            max_weight = 1  # dp: each update weighs 1
        roster = SecaggRoster(format=FORMAT_VERSION, run_id=self.a.run_id, round=self.r, step=step, workers=workers,
                              clip=self.cfg.clip_norm, max_weight=max_weight, keys=keys)
        if step == 3:
            short = self._short_of_threshold(set(workers))
            if short:
                return self._redo(short, server_state)
        roster.signature = self.identity.sign(roster_message(roster))
        self.share.write_yaml(names.secagg_roster(self.r, step), to_dict(roster))
        crash_point(f"coordinator:secure-roster-{step}:{self.r}")
        self.rosters[step] = roster
        self.log(f"round {self.r}: secure aggregation: {len(workers)} worker(s) sent their {STEPS[step - 1]}"
                 + (f"; not {', '.join(sorted(self.step.problems))}" if self.step.problems else ""))
        self.dropped.update({w: p if not p.reason.waits else Unusable(
            Reason.SECURE_STEP, f"{p.detail} at the deadline of the step") for w, p in self.step.problems.items()})
        self.step = _Step(time.monotonic())
        return None

    def _short_of_threshold(self, survivors: set[str]) -> str:
        """Why the survivors cannot unmask the sum (a secret with fewer holders left than its threshold), or ""."""
        rnd = self._round()
        for w in self.rosters[2].workers:
            left = len(set(rnd.graph.holders(w)) & survivors)
            if left < rnd.graph.threshold(w):
                return (f"only {left} of the {len(rnd.graph.holders(w))} holders of {w}'s secrets sent a masked "
                        f"input, {rnd.graph.threshold(w)} needed to unmask the sum")
        return ""

    def _round(self) -> Round:
        """The round as roster 1 fixes it (its graph), derived once."""
        if self._fixed is None:
            self._fixed = round_of(self.rosters[1], self.a)
        return self._fixed

    # -- each step's file, checked ---------------------------------------------------------------------------------

    def _signed(self, worker: str, message: bytes, signature: str | None, what: str) -> None:
        key = self.trust.key_of(worker)
        if key is None or not verify(key, message, signature):
            raise Unusable(Reason.SECURE_STEP, f"{worker}'s {what} is not signed with its trusted key")

    def _read(self, cls: type, name: str, worker: str, what: str):  # type: ignore[no-untyped-def]
        if not self.share.exists(name):
            raise Unusable(Reason.MISSING_FILE, f"{worker} has not sent its {what} (yet)")
        try:
            record = self.share.read_record(cls, name)
        except (MarkerError, OSError, ValueError) as e:
            raise Unusable(Reason.MARKER_UNREADABLE, f"{worker}'s {what}: {e}") from None
        if record.round != self.r or record.worker != worker:
            raise Unusable(Reason.SECURE_STEP, f"{worker}'s {what} is for another round or worker")
        return record

    def _keys(self, worker: str) -> SecaggKeys:
        record = self._read(SecaggKeys, names.secagg_keys(self.r, worker), worker, "keys")
        self._signed(worker, keys_message(self.a.run_id, record), record.signature, "keys")
        try:
            public_key(record.c_key), public_key(record.s_key)
        except ValueError as e:
            raise Unusable(Reason.SECURE_STEP, f"{worker}'s keys: {e}") from None
        return record

    def _envelopes(self, worker: str) -> SecaggShares:
        record = self._read(SecaggShares, names.secagg_shares(self.r, worker), worker, "envelopes")
        self._signed(worker, shares_message(self.a.run_id, record), record.signature, "envelopes")
        holders = set(self._round().graph.holders(worker))
        if set(record.envelopes) != holders:
            raise Unusable(Reason.SECURE_STEP, f"{worker}'s envelopes are for {sorted(record.envelopes)}, not its "
                                               f"holders {sorted(holders)}")
        return record

    def _masked(self, worker: str) -> UpdateMarker:
        name = self.share.update_marker(self.r, worker)
        m = self._read(UpdateMarker, name, worker, "masked input")
        self.trust.check_update(self.a, worker, m, names.basename(name))
        if m.diverged is not None:
            raise Unusable(Reason.DIVERGED, m.diverged)
        if m.encoding != ENCODING or m.tensors is None or m.tensors.file != names.update_tensors_name(worker):
            raise Unusable(Reason.SECURE_STEP, f"{worker}'s marker does not name a masked input "
                                               f"({names.update_tensors_name(worker)}, encoding {ENCODING})")
        most = self.bounds(self.a, worker).train if self.privacy else min(self.bounds(self.a, worker).train,
                                                                          self.rosters[1].max_weight)
        if not 0 < m.samples <= most or m.steps < 1:
            raise Unusable(Reason.BAD_SAMPLES, f"samples={m.samples}, steps={m.steps}")
        data = self.share.read_verified(self.share.update_tensors(self.r, worker), m.tensors)
        try:
            words = st_load(data)[MASKED]
        except Exception as e:  # noqa: BLE001 - the library reports malformed files with several exception types
            raise Unusable(Reason.NOT_SAFETENSORS, f"{worker}'s masked input: {e}") from None
        if words.dtype != torch.int32 or tuple(words.shape) != (length(self.layout),):
            raise Unusable(Reason.WRONG_SHAPE, f"{worker}'s masked input is {words.dtype} {list(words.shape)}, not "
                                               f"int32 [{length(self.layout)}]")
        if self.total is None:
            self.total = words.numpy().view(np.uint32).copy()
        else:
            self.total += words.numpy().view(np.uint32)  # mod 2^32
        self.markers[worker] = m
        return m

    def _reveal(self, worker: str) -> dict[str, tuple[str, bytes]]:
        record = self._read(SecaggReveal, names.secagg_reveal(self.r, worker), worker, "revealed shares")
        self._signed(worker, reveal_message(self.a.run_id, record), record.signature, "revealed shares")
        survivors, sharers = set(self.rosters[3].workers), set(self.rosters[2].workers)
        out = {}
        for sender, text in record.shares.items():
            kind, _, b64 = text.partition(":")
            allowed = SELF if sender in survivors else PAIR if sender in sharers else None
            try:
                share = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                continue
            if kind == allowed and len(share) == shamir.SHARE_BYTES:
                out[sender] = (kind, share)
        return out

    # -- the end of the round ----------------------------------------------------------------------------------------

    def _try_unmask(self, optimizer: ServerOptimizer, server_state: Tensors) -> Closing | None:
        rnd = self._round()
        survivors, sharers = set(self.rosters[3].workers), set(self.rosters[2].workers)
        revealed: dict[str, dict[str, tuple[str, bytes]]] = self.step.found  # type: ignore[assignment]
        for sender in sharers:
            kind = SELF if sender in survivors else PAIR
            got = sum(1 for answer in revealed.values() if answer.get(sender, ("", b""))[0] == kind)
            if got < rnd.graph.threshold(sender):
                if self.remaining() > 0:
                    return None
                secret = "self seed" if kind == SELF else "pairwise secret"
                return self._redo(f"only {got} share(s) of {sender}'s {secret} were revealed by the deadline, "
                                  f"{rnd.graph.threshold(sender)} needed", server_state)
        if self.total is None or set(self.markers) != survivors:  # a restarted coordinator: sum them again
            self.total, self.markers = None, {}
            for w in sorted(survivors):
                self._masked(w)
        assert self.total is not None
        _, s_publics = publics(self.rosters[1])
        try:
            masks = masks_to_remove(rnd, revealed, s_publics, sharers, survivors)
        except shamir.ShareError as e:
            return self._redo(f"the revealed shares do not give the secrets back ({e})", server_state)
        summed = self.total  # unmasked in place, slice by slice on every lane (ChaCha20 and numpy drop the GIL)
        with ThreadPoolExecutor(cores(), thread_name_prefix="unmask") as pool:
            list(pool.map(lambda at: add_masks(summed[at:at + SLICE], at, masks, -1), range(0, len(summed), SLICE)))
        code, noise = encoding(self.rosters[1], self.cfg.dp), None
        mean, weights = unflatten(code.decode(summed), self.layout, self.rosters[1].clip,
                                  self.privacy.denominator if self.privacy else None)
        if self.privacy is not None:
            noise = self._noise(mean, len(survivors))
        steps = int(statistics.median(m.steps for m in self.markers.values()))
        delta = {k: mean[k] if k in mean else torch.full_like(v, steps) for k, v in self.state.items()}
        new_state, new_server_state = optimizer.step(self.state, delta, server_state)
        self.log(f"round {self.r}: secure aggregation: unmasked the sum of {len(survivors)} masked inputs "
                 f"(weights {weights:.1f}; {len(sharers - survivors)} dropped after sharing)")
        return self._closing(self.why, new_state, new_server_state, noise)

    def _noise(self, mean: Tensors, survivors: int) -> float:
        """The noise multiplier of the released sum (dp). Central: the coordinator adds N(0, (z clip)^2) to the sum
        now. Distributed: each of roster 2's workers put in its part, so the survivors' parts add up to
        z x sqrt(survivors / roster 2's workers)."""
        assert self.privacy is not None and self.cfg.dp is not None
        if self.cfg.dp.noise == "central":
            add_gaussian_(mean, self.privacy.central_std / self.privacy.denominator, fresh_generator())
            return self.privacy.noise_multiplier
        return self.cfg.dp.noise_multiplier * math.sqrt(survivors / len(self.rosters[2].workers))

    def _redo(self, why: str, server_state: Tensors) -> Closing:
        self.log(f"round {self.r}: secure aggregation: the round is redone, its model unchanged: {why}")
        return self._closing(f"redone: {why}", self.state, server_state)

    def _closing(self, reason: str, new_state: Tensors, server_state: Tensors,
                 noise_multiplier: float | None = None) -> Closing:
        accepted = [Accepted(worker=w, samples=m.samples, steps=m.steps, weight=float(m.samples),
                             train_loss=m.train_loss, seconds=m.seconds, device=m.device, norm=None, clipped=False,
                             evaluation=m.evaluation, bytes=m.tensors.bytes if m.tensors else None,
                             train_s=(m.timings or {}).get("train_s"))
                    for w, m in sorted(self.markers.items())] if not reason.startswith("redone") else []
        problems = {**self.dropped, **self.step.problems}
        rejected = [Rejected(w, names.update_marker_in_round(w), p.reason.value, p.detail)
                    for w, p in sorted(problems.items()) if w not in self.markers or not accepted]
        reported = {x.worker for x in accepted} | {x.worker for x in rejected}
        return Closing(self.r, reason, new_state, server_state, 1.0, accepted, rejected,
                       sorted(set(self.a.workers) - reported), [], [], time.monotonic() - self.opened, {},
                       noise_multiplier=noise_multiplier)
