"""Secure aggregation's maths (fedsync/aggregation/secagg/): Shamir sharing from every t-subset, masks that cancel,
the integer encoding's error bound, the graph, envelopes, and whole rounds in memory with workers dropping at each
step: the unmasked sum is the survivors' weighted sum within the encoding's bound, and what the coordinator holds
of one worker is masked."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from fedsync.aggregation.secagg import shamir
from fedsync.aggregation.secagg.encoding import Encoding
from fedsync.aggregation.secagg.envelope import EnvelopeError, RoundSecrets, open_envelope, seal_envelope
from fedsync.aggregation.secagg.graph import build, degree
from fedsync.aggregation.secagg.masks import expand, pair_context, pair_seed
from fedsync.aggregation.secagg.rounds import (
    RevealRefused,
    Round,
    add_masks,
    masks_of,
    masks_to_remove,
    reveal,
    share_out,
)


@pytest.mark.parametrize("n, t", [(3, 2), (5, 3), (7, 4), (6, 6)])
def test_every_t_subset_of_the_shares_gives_the_secret_back_and_fewer_do_not(n: int, t: int) -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    for subset in itertools.combinations(shares, t):
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(shares, t - 1):  # t - 1 shares: any secret fits them
        with pytest.raises(shamir.ShareError, match="needed"):
            shamir.combine({x: shares[x] for x in subset}, t)
        if t > 1:  # interpolating t - 1 shares and a made-up one gives another value
            made_up = {**{x: shares[x] for x in subset}, n + 1: 12345}
            try:
                assert shamir.combine(made_up, t) != secret
            except shamir.ShareError:
                pass  # or not even a 32-byte value


def test_shares_of_different_secrets_do_not_combine_and_bad_input_is_refused() -> None:
    a, b = shamir.split(os.urandom(32), 3, [1, 2, 3]), shamir.split(os.urandom(32), 3, [1, 2, 3])
    with pytest.raises(shamir.ShareError, match="different secrets"):
        shamir.combine({1: a[1], 2: a[2], 3: b[3]}, 3)
    with pytest.raises(shamir.ShareError, match="32 bytes"):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(shamir.ShareError, match="distinct"):
        shamir.split(os.urandom(32), 2, [1, 1])
    assert shamir.from_bytes(shamir.to_bytes(a[1])) == a[1]


def test_a_mask_slice_is_the_same_words_as_the_whole_mask_and_pairs_agree() -> None:
    seed = os.urandom(32)
    whole = expand(seed, 0, 4096)
    for start, length in [(0, 16), (16, 100), (1024, 3072), (4000, 96)]:
        assert np.array_equal(expand(seed, start, length), whole[start:start + length])
    assert expand(os.urandom(32), 0, 4096).std() > 1e9  # uniform over 32 bits: spread across the range
    with pytest.raises(ValueError, match="multiple of 16"):
        expand(seed, 5, 10)
    u, v = RoundSecrets.generate(), RoundSecrets.generate()
    context = pair_context("run", 3, "u", "v")
    assert pair_context("run", 3, "v", "u") == context
    assert pair_seed(u.s, v.s.public_key(), context) == pair_seed(v.s, u.s.public_key(), context)
    assert pair_seed(u.s, v.s.public_key(), pair_context("run", 4, "u", "v")) != pair_seed(u.s, v.s.public_key(),
                                                                                           context)


def test_the_encoding_decodes_a_sum_within_its_bound_at_the_extremes() -> None:
    enc = Encoding(clip=5.0, max_weight=600, workers=20)
    g = np.random.default_rng(0)
    values = [np.clip(g.normal(size=1000) * 3, -5, 5) for _ in range(20)]
    for v in values:
        v[:10] = 5.0  # the largest coordinates every worker may send, all of one sign, at the largest weights
    weights = [600] * 10 + list(g.integers(1, 600, size=10))
    words = sum((enc.encode(v, w) for v, w in zip(values, weights)), np.zeros(1000, dtype=np.uint32))
    exact = sum(v * w for v, w in zip(values, weights))
    assert np.abs(enc.decode(words) - exact).max() <= enc.error_bound()
    with pytest.raises(ValueError, match="max_weight"):
        enc.encode(values[0], 601)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_every_worker_at_max_weight_sums_to_the_limit_and_no_further(workers: int) -> None:
    """The weight coordinates of n workers that all hold max_weight samples sum to exactly 2^31 - 1 in exact
    arithmetic: rounding each to the nearest integer carried two workers of 32 examples past it, and the round's
    mean came out negated (found by a causal_lm run, whose workers held 32 texts each)."""
    enc = Encoding(clip=5.0, max_weight=32, workers=workers)
    vector = np.array([0.1, -0.2, 5.0, -5.0, 5.0])  # the last: the weight coordinate, `clip`
    words = sum((enc.encode(vector, 32) for _ in range(workers)), np.zeros(5, dtype=np.uint32))
    got = enc.decode(words)
    assert got[-1] / 5.0 == pytest.approx(32 * workers, rel=1e-6)
    assert np.abs(got - vector * 32 * workers).max() <= enc.error_bound()


def test_the_graph_is_sparse_symmetric_and_the_same_for_everyone() -> None:
    for n in (2, 5, 20, 100):
        workers = [f"w{i:03d}" for i in range(n)]
        g = build(workers, "model-hash")
        assert g == build(list(reversed(workers)), "model-hash")  # everyone derives the same graph
        assert all(w not in g.neighbours[w] and all(w in g.neighbours[v] for v in g.neighbours[w]) for w in workers)
        assert {len(v) for v in g.neighbours.values()} == {degree(n)}
    assert degree(5) == 4 and degree(20) == 10 and degree(100) == 14 and degree(1000) == 20


def test_an_envelope_opens_only_for_its_holder_in_its_round() -> None:
    u, v, w = RoundSecrets.generate(), RoundSecrets.generate(), RoundSecrets.generate()
    env = seal_envelope(b"share", u.c, v.c.public_key(), "run", 2, "u", "v")
    assert open_envelope(env, v.c, u.c.public_key(), "run", 2, "u", "v") == b"share"
    for args in [(w.c, u.c.public_key(), "run", 2, "u", "v"), (v.c, u.c.public_key(), "run", 3, "u", "v"),
                 (v.c, u.c.public_key(), "run", 2, "u", "w"), (v.c, u.c.public_key(), "other", 2, "u", "v")]:
        with pytest.raises(EnvelopeError, match="does not open"):
            open_envelope(env, *args)  # type: ignore[arg-type]


def _round(n: int, drop_keys: set[str], drop_shares: set[str], drop_masked: set[str], drop_reveal: set[str],
           length: int = 5000):
    """A whole round in memory; returns (decoded mean, exact mean of the survivors, what the coordinator read)."""
    names = [f"w{i}" for i in range(n)]
    g = np.random.default_rng(1)
    updates = {w: np.clip(g.normal(size=length) * 0.1, -1, 1) for w in names}
    weights = {w: int(g.integers(50, 300)) for w in names}
    enc = Encoding(clip=1.0, max_weight=300, workers=n)
    secrets = {w: RoundSecrets.generate() for w in names}
    u1 = [w for w in names if w not in drop_keys]  # step 1: keys published
    publics = {w: secrets[w].publics() for w in u1}
    c_pub, s_pub = {w: p[0] for w, p in publics.items()}, {w: p[1] for w, p in publics.items()}
    r = Round("run", 7, build(u1, "hash"))
    envelopes = {w: share_out(r, w, secrets[w], c_pub) for w in u1 if w not in drop_shares}  # step 2
    u2 = set(envelopes)
    inputs = {}
    for w in sorted(u2 - drop_masked):  # step 3: the encoded weighted update plus masks, in two slices
        encoded = np.concatenate([enc.encode(updates[w], weights[w]), enc.encode(np.ones(16), weights[w])[:16]])
        masks = masks_of(r, w, secrets[w], s_pub, u2)
        add_masks(encoded[:4096], 0, masks)
        add_masks(encoded[4096:], 4096, masks)
        inputs[w] = encoded
    u3 = set(inputs)
    revealed = {h: reveal(r, h, secrets[h], {s: envelopes[s][h] for s in u2 if h in envelopes[s]}, c_pub, u2, u3)
                for h in sorted(u3 - drop_reveal)}  # step 4
    total = sum(inputs.values(), np.zeros(length + 16, dtype=np.uint32))
    summed, masks = total.copy(), masks_to_remove(r, revealed, s_pub, u2, u3)
    add_masks(summed[:2048], 0, masks, -1)
    add_masks(summed[2048:], 2048, masks, -1)
    weighted = enc.decode(summed)
    weight_sum = weighted[length:].mean()  # the weights, encoded as a coordinate of ones
    exact = sum(updates[w] * weights[w] for w in u3) / sum(weights[w] for w in u3)
    return weighted[:length] / weight_sum, exact, inputs, updates, weights, enc, sum(weights[w] for w in u3)


@pytest.mark.parametrize("drops", [
    dict(), dict(drop_keys={"w1"}), dict(drop_shares={"w2"}), dict(drop_masked={"w3", "w4"}),
    dict(drop_masked={"w0"}, drop_reveal={"w1"}), dict(drop_keys={"w6"}, drop_shares={"w5"}, drop_masked={"w4"}),
], ids=["all", "keys", "shares", "two-after-sharing", "after-masking", "one-per-step"])
def test_a_round_unmasks_the_survivors_weighted_mean_whoever_drops(drops: dict[str, set[str]]) -> None:
    n = 7 if "drop_keys" in drops and "w6" in drops["drop_keys"] else 5
    kw = {k: drops.get(k, set()) for k in ("drop_keys", "drop_shares", "drop_masked", "drop_reveal")}
    mean, exact, inputs, updates, weights, enc, weight_sum = _round(n, **kw)
    # the bound: each of the survivors' words errs by half a step, the weights' coordinate too
    assert np.abs(mean - exact).max() <= 2 * enc.error_bound() / weight_sum + 1e-12
    for w, y in inputs.items():  # the coordinator's input from one worker is masked: unrelated to its update
        plain = enc.encode(updates[w], weights[w])
        assert abs(np.corrcoef(y[:5000].astype(np.float64), plain.astype(np.float64))[0, 1]) < 0.1


def test_below_the_threshold_nothing_is_revealed_and_rosters_that_disagree_are_refused() -> None:
    names = [f"w{i}" for i in range(5)]
    secrets = {w: RoundSecrets.generate() for w in names}
    c_pub = {w: secrets[w].publics()[0] for w in names}
    r = Round("run", 1, build(names, "h"))
    envelopes = {w: share_out(r, w, secrets[w], c_pub) for w in names}
    held = {s: envelopes[s]["w0"] for s in names}
    with pytest.raises(RevealRefused, match="fewer than 3"):
        reveal(r, "w0", secrets["w0"], held, c_pub, set(names), {"w0", "w1"})  # 2 of 5 survived, 3 needed
    with pytest.raises(RevealRefused, match="rosters disagree"):
        reveal(r, "w0", secrets["w0"], held, c_pub, {"w0", "w1", "w2"}, {"w0", "w1", "w2", "w3"})
    answer = reveal(r, "w0", secrets["w0"], held, c_pub, set(names), {"w0", "w1", "w2"})
    assert {s: kind for s, (kind, _) in answer.items()} == {"w0": "self", "w1": "self", "w2": "self",
                                                            "w3": "pair", "w4": "pair"}  # one kind per sender
