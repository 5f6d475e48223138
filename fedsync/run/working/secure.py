"""A worker's part in secure-aggregation rounds (docs/PROTOCOL.md section 5.16), step by step. Each step writes one
file of the worker's own, once; which step is due follows from the files in the share alone, so a restarted
worker (its round secrets kept on its own disk) continues where it stopped:

1. the round is open: publish two public keys;
2. the coordinator's roster 1 names this worker: seal a pair of shares to each holder of its secrets;
3. roster 2 names it: train (the worker's usual round) and write the masked input (`masked_input`);
4. roster 3 names it: reveal, for each sender it holds shares of, the one share the protocol allows.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import numpy as np
import torch

from fedsync.aggregation.privacy.noise import discrete_gaussian, distributed_clip, fresh_rng, worker_sigma
from fedsync.aggregation.privacy.settings import DPSettings
from fedsync.aggregation.secagg.envelope import RoundSecrets
from fedsync.aggregation.secagg.rounds import RevealRefused, add_masks, masks_of, reveal, share_out
from fedsync.aggregation.secagg.vector import flatten, length
from fedsync.base.faults import crash_point
from fedsync.base.logs import Log
from fedsync.run.secure import MASKED, SLICE, encoding, publics, read_roster, round_of
from fedsync.storage import names
from fedsync.storage.keys import Identity, forget_round_secrets, keep_round_secret, round_secret_path
from fedsync.storage.markers import FORMAT_VERSION, Assignment, to_dict
from fedsync.storage.secagg_files import (
    SecaggKeys,
    SecaggReveal,
    SecaggRoster,
    SecaggShares,
    keys_message,
    reveal_message,
    shares_message,
)
from fedsync.storage.share import Share
from fedsync.tensors.files import Layout


class SecureWorker:
    def __init__(self, share: Share, run_id: str, name: str, identity: Identity, coordinator_key: str,
                 log: Log, dp: DPSettings | None = None) -> None:
        """`dp`: the run's differential privacy; with distributed noise this worker adds its part of it."""
        self.share, self.run_id, self.name, self.identity = share, run_id, name, identity
        self.coordinator_key, self.log, self.dp = coordinator_key, log, dp

    def secrets(self, r: int) -> RoundSecrets:
        """This worker's secrets of round r: made at its first step, kept on its own disk."""
        path = round_secret_path(self.run_id, self.name, r)
        try:
            return RoundSecrets.from_raw(keep_round_secret(path, lambda: RoundSecrets.generate().raw()))
        except ValueError as e:
            raise ValueError(f"{path} is not a round secret ({e}): delete it") from None

    def roster(self, r: int, step: int) -> SecaggRoster | None:
        return read_roster(self.share, self.run_id, r, step, self.coordinator_key)

    def may_train(self, r: int) -> bool:
        """Roster 2 names this worker: its masked input is due."""
        roster = self.roster(r, 2)
        return roster is not None and self.name in roster.workers

    def advance(self, r: int, a: Assignment) -> bool:
        """Take the step of round r that is due now, other than training (steps 1, 2 and 4); whether it took one."""
        if not self.share.exists(names.secagg_keys(r, self.name)):
            self._publish(r)
            return True
        first = self.roster(r, 1)
        if first is None or self.name not in first.workers:
            return False
        if not self.share.exists(names.secagg_shares(r, self.name)):
            self._share_out(r, a, first)
            return True
        third = self.roster(r, 3)
        if third is None or self.name not in third.workers or self.share.exists(names.secagg_reveal(r, self.name)):
            return False
        second = self.roster(r, 2)
        if second is None:
            return False
        self._reveal(r, a, first, second, third)
        return True

    def _publish(self, r: int) -> None:
        forget_round_secrets(self.run_id, self.name, before=r)  # a new round: the closed ones' secrets go
        c, s = self.secrets(r).publics()
        record = SecaggKeys(format=FORMAT_VERSION, round=r, worker=self.name, c_key=c, s_key=s)
        record.signature = self.identity.sign(keys_message(self.run_id, record))
        self.share.write_yaml(names.secagg_keys(r, self.name), to_dict(record))
        crash_point(f"worker:secure-keys:{r}")
        self.log(f"round {r}: secure aggregation: published this round's keys")

    def _share_out(self, r: int, a: Assignment, first: SecaggRoster) -> None:
        c_publics, _ = publics(first)
        envelopes = share_out(round_of(first, a), self.name, self.secrets(r), c_publics)
        record = SecaggShares(format=FORMAT_VERSION, round=r, worker=self.name,
                              envelopes={h: base64.b64encode(e).decode() for h, e in envelopes.items()})
        record.signature = self.identity.sign(shares_message(self.run_id, record))
        self.share.write_yaml(names.secagg_shares(r, self.name), to_dict(record))
        crash_point(f"worker:secure-shares:{r}")
        self.log(f"round {r}: secure aggregation: sealed shares of this round's secrets to {len(envelopes)} holders")

    def masked_input(self, r: int, a: Assignment, delta: Mapping[str, torch.Tensor], layout: Layout,
                     weight: int) -> tuple[dict[str, torch.Tensor], float]:
        """Step 3: the masked input's one tensor (the clipped, weighted, encoded update plus the masks, as int32),
        and the update's L2 norm before clipping. Under dp every update weighs 1; with distributed noise it is
        clipped a little inside the bound (so its rounded integers stay within it) and carries its part of the
        round's discrete Gaussian noise."""
        first, second = self.roster(r, 1), self.roster(r, 2)
        assert first is not None and second is not None, "masked_input before rosters 1 and 2"
        code = encoding(first, self.dp)
        if self.dp is None:
            values, norm = flatten(delta, layout, first.clip)
            words = code.encode(values, weight)
        else:
            inner = first.clip
            if self.dp.noise == "distributed":
                inner = distributed_clip(first.clip, code.scale, length(layout) - 1)
            values, norm = flatten(delta, layout, inner, counted=False)
            words = code.encode(values, 1)
            if self.dp.noise == "distributed":
                sigma = worker_sigma(self.dp.noise_multiplier, first.clip, code.scale, len(second.workers))
                noise = discrete_gaussian(fresh_rng(), sigma, len(words) - 1)
                words[:-1] += noise.astype(np.uint32)  # two's complement: adds mod 2^32
        _, s_publics = publics(first)
        masks = masks_of(round_of(first, a), self.name, self.secrets(r), s_publics, set(second.workers))
        for start in range(0, len(words), SLICE):
            add_masks(words[start:start + SLICE], start, masks)
        return {MASKED: torch.from_numpy(words.view(np.int32))}, norm

    def _reveal(self, r: int, a: Assignment, first: SecaggRoster, second: SecaggRoster,
                third: SecaggRoster) -> None:
        rnd = round_of(first, a)
        c_publics, _ = publics(first)
        held: dict[str, bytes] = {}
        for sender in second.workers:
            if self.name not in rnd.graph.holders(sender):
                continue
            try:
                record = self.share.read_record(SecaggShares, names.secagg_shares(r, sender))
                held[sender] = base64.b64decode(record.envelopes[self.name], validate=True)
            except (KeyError, binascii.Error, ValueError, OSError) as e:
                self.log(f"round {r}: secure aggregation: {sender}'s envelope for this worker is unusable ({e}); "
                         "its share is not revealed")
        try:
            answer = reveal(rnd, self.name, self.secrets(r), held, c_publics, set(second.workers),
                            set(third.workers))
        except RevealRefused as e:
            self.log(f"round {r}: secure aggregation: reveals nothing: {e}")
            answer = {}
        record = SecaggReveal(format=FORMAT_VERSION, round=r, worker=self.name,
                              shares={s: f"{kind}:{base64.b64encode(share).decode()}"
                                      for s, (kind, share) in answer.items()})
        record.signature = self.identity.sign(reveal_message(self.run_id, record))
        self.share.write_yaml(names.secagg_reveal(r, self.name), to_dict(record))
        self.log(f"round {r}: secure aggregation: revealed {len(answer)} share(s) for the round's sum")
