"""One secure-aggregation round as pure steps, in the order the round's files are written (docs/PROTOCOL.md):

1. each worker publishes its two public keys (`RoundSecrets.publics`); the coordinator names those that did (U1);
2. each worker of U1 splits its self seed and its pairwise secret among its holders in the graph over U1 and seals
   each holder's pair of shares in an envelope (`share_out`); the coordinator names those that did (U2);
3. each worker of U2 writes its encoded update plus its self mask plus its pairwise masks with its neighbours in U2
   (`masks_of`, added slice by slice with `add_masks`); the coordinator names those whose masked input arrived (U3);
4. each worker of U3 opens the envelopes addressed to it and reveals, for each sender, the share of its self seed
   if the sender is in U3 or the share of its pairwise secret if it dropped after step 2, never both
   (`reveal`); the coordinator combines them and takes the masks out of the sum of U3's inputs (`masks_to_remove`,
   then `add_masks` backwards).

Everything is mod 2^32 (numpy uint32 wraps). Nothing here reads or writes a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsync.aggregation.secagg import shamir
from fedsync.aggregation.secagg.envelope import (
    EnvelopeError,
    RoundSecrets,
    open_envelope,
    public_key,
    s_secret,
    seal_envelope,
)
from fedsync.aggregation.secagg.graph import Graph
from fedsync.aggregation.secagg.masks import expand, pair_context, pair_seed, pair_sign

SELF, PAIR = "self", "pair"  # which secret a revealed share is of


class RevealRefused(ValueError):
    """A worker refuses to reveal shares: too few survivors, or a survivor that is also said to have dropped."""


@dataclass(frozen=True)
class Round:
    """What every party of one round agrees on: the run, the round and the graph over U1."""

    run_id: str
    round: int
    graph: Graph


def share_out(r: Round, worker: str, secrets: RoundSecrets, c_publics: Mapping[str, str]) -> dict[str, bytes]:
    """Step 2: for each holder of `worker`'s secrets, an envelope with its share of the self seed and of the
    pairwise secret (`c_publics`: each holder's envelope key, as it published it)."""
    holders = r.graph.holders(worker)
    t = r.graph.threshold(worker)
    points = [r.graph.point(worker, h) for h in holders]
    seeds = shamir.split(secrets.self_seed, t, points)
    pairs = shamir.split(secrets.s.private_bytes_raw(), t, points)
    out = {}
    for h, x in zip(holders, points):
        data = shamir.to_bytes(seeds[x]) + shamir.to_bytes(pairs[x])
        out[h] = seal_envelope(data, secrets.c, public_key(c_publics[h]), r.run_id, r.round, worker, h)
    return out


def masks_of(r: Round, worker: str, secrets: RoundSecrets, s_publics: Mapping[str, str],
             sharers: set[str]) -> list[tuple[bytes, int]]:
    """Step 3: the masks `worker` adds to its encoded update, as (seed, sign): its self mask (+1), and the pairwise
    mask with each neighbour that shared (U2), +1 for the name that sorts first, -1 for the other."""
    out = [(secrets.self_seed, 1)]
    for v in r.graph.neighbours[worker]:
        if v in sharers:
            seed = pair_seed(secrets.s, public_key(s_publics[v]), pair_context(r.run_id, r.round, worker, v))
            out.append((seed, pair_sign(worker, v)))
    return out


def reveal(r: Round, holder: str, secrets: RoundSecrets, envelopes: Mapping[str, bytes], c_publics: Mapping[str, str],
           sharers: set[str], survivors: set[str]) -> dict[str, tuple[str, bytes]]:
    """Step 4: for each sender whose envelope `holder` holds, (SELF, its share of the sender's self seed) if the
    sender survived, (PAIR, its share of the sender's pairwise secret) if it shared but dropped; never both kinds
    for one sender; nothing for a sender whose envelope does not open. Refused when the survivors are fewer than
    any sender's threshold, or are not all sharers."""
    if not survivors <= sharers:
        raise RevealRefused("the survivors named are not all among those that shared: the rosters disagree")
    out: dict[str, tuple[str, bytes]] = {}
    for sender, envelope in sorted(envelopes.items()):
        if sender not in sharers:
            continue
        if len(set(r.graph.holders(sender)) & survivors) < r.graph.threshold(sender):
            raise RevealRefused(f"fewer than {r.graph.threshold(sender)} of {sender}'s holders survived: nothing "
                                "is revealed, the round is redone")
        try:
            data = open_envelope(envelope, secrets.c, public_key(c_publics[sender]), r.run_id, r.round, sender,
                                 holder)
        except EnvelopeError:
            continue  # sealed to another key or altered: that sender's share is not this holder's to give
        if len(data) != 2 * shamir.SHARE_BYTES:
            continue
        seed_share, pair_share = data[:shamir.SHARE_BYTES], data[shamir.SHARE_BYTES:]
        out[sender] = (SELF, seed_share) if sender in survivors else (PAIR, pair_share)
    return out


def masks_to_remove(r: Round, revealed: Mapping[str, Mapping[str, tuple[str, bytes]]], s_publics: Mapping[str, str],
                    sharers: set[str], survivors: set[str]) -> list[tuple[bytes, int]]:
    """The masks in the survivors' summed inputs that are not cancelled, as (seed, sign): each survivor's self mask
    (+1), and each pairwise mask a survivor shares with one that dropped after sharing (the sign the survivor added
    it with). Each secret is rebuilt once from the revealed shares (`revealed`: holder -> its step-4 answer);
    shamir.ShareError when one does not come back."""
    out = [(_secret(r, u, SELF, revealed), 1) for u in sorted(survivors)]
    for v in sorted(sharers - survivors):
        secret = s_secret(_secret(r, v, PAIR, revealed))
        for u in r.graph.neighbours[v]:
            if u in survivors:
                out.append((pair_seed(secret, public_key(s_publics[u]), pair_context(r.run_id, r.round, u, v)),
                            pair_sign(u, v)))
    return out


def add_masks(words: np.ndarray, start: int, masks: list[tuple[bytes, int]], direction: int = 1) -> None:
    """Add each mask (seed, sign) to `words`, a uint32 slice starting at word `start`, in place and mod 2^32,
    times `direction`: +1 masks an encoded update (masks_of), -1 takes masks out of a sum (masks_to_remove). Each mask
    is expanded for this slice alone."""
    for seed, sign in masks:
        mask = expand(seed, start, len(words))
        if sign * direction > 0:
            words += mask
        else:
            words -= mask


def _secret(r: Round, sender: str, kind: str, revealed: Mapping[str, Mapping[str, tuple[str, bytes]]]) -> bytes:
    shares = {r.graph.point(sender, h): shamir.from_bytes(answer[sender][1])
              for h, answer in revealed.items() if sender in answer and answer[sender][0] == kind}
    return shamir.combine(shares, r.graph.threshold(sender))
