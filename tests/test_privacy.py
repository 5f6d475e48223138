"""Differential privacy's parts on their own (fedsync/aggregation/privacy/, the coordinator's budget, a worker's
DP-SGD): the noise has the scale the formulas give, clipping bounds every contribution, the accountant's epsilon is the
library's for the same mechanism, adaptive clipping's split of the budget composes to the chosen multiplier, the
distributed noise of a secure sum has the central noise's distribution, and bad settings are refused with their
reason."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from opacus.accountants import RDPAccountant

from fedsync.aggregation.optimizers import make_optimizer
from fedsync.aggregation.privacy.accounting import Release, epsilon, noise_for
from fedsync.aggregation.privacy.mean import PrivateMean
from fedsync.aggregation.privacy.noise import (
    HEADROOM_SIGMAS,
    add_gaussian_,
    discrete_gaussian,
    distributed_clip,
    fresh_generator,
    next_clip,
    noisy_fraction_under,
    update_noise_multiplier,
    worker_sigma,
)
from fedsync.aggregation.privacy.settings import DPSettings
from fedsync.aggregation.secagg.encoding import Encoding
from fedsync.aggregation.secagg.vector import flatten
from fedsync.base.errors import ConfigError
from fedsync.learning.data import Split
from fedsync.learning.dp_sgd import dp_local_train
from fedsync.learning.tasks import get_task
from fedsync.learning.train import TrainSettings
from fedsync.run.config import load_config
from fedsync.run.coordinating.budget import Budget
from fedsync.run.coordinating.intake import RoundIntake
from fedsync.run.coordinating.ledger import Bound
from fedsync.run.start import check_privacy, open_run
from fedsync.run.trust import Trust
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, PrivacyRecord, Summary, WorkerTask, to_dict
from fedsync.storage.share import Share
from fedsync.tensors.files import layout_of, save_state

from .helpers import coordinator_identity, coordinator_opener, submit_update, worker_identity, write_yaml

DP = {"model": "digits_cnn_gn", "clip_norm": 1.0, "dp": {"noise_multiplier": 1.0}}


# -- the noise ------------------------------------------------------------------------------------------------------

def test_gaussian_noise_has_the_standard_deviation_asked_for() -> None:
    t = {"w": torch.zeros(400_000), "n": torch.zeros(3, dtype=torch.int64)}
    add_gaussian_(t, 0.37, fresh_generator())
    assert float(t["w"].std()) == pytest.approx(0.37, rel=0.01) and abs(float(t["w"].mean())) < 0.003  # 5 sigma
    assert int(t["n"].abs().sum()) == 0  # integer tensors are not noised


@pytest.mark.parametrize("sigma", [0.8, 1.5, 6.0])
def test_the_discrete_gaussian_matches_its_probability_mass(sigma: float) -> None:
    x = discrete_gaussian(np.random.default_rng(1), sigma, 400_000)
    ks = np.arange(-int(8 * sigma) - 2, int(8 * sigma) + 3)
    p = np.exp(-ks.astype(float) ** 2 / (2 * sigma * sigma))
    p /= p.sum()
    counts = np.array([(x == k).sum() for k in ks])
    assert counts.sum() == len(x)  # nothing outside eight sigmas
    expected = p * len(x)
    keep = expected > 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum()
    assert chi2 < 3 * keep.sum(), chi2  # far below for a right sampler, far above for a wrong one


def test_a_large_discrete_gaussian_has_its_variance() -> None:
    x = discrete_gaussian(np.random.default_rng(2), 4.3e7, 300_000)
    assert x.std() == pytest.approx(4.3e7, rel=0.01) and abs(x.mean()) < 4.3e7 * 0.01


def test_distributed_noise_in_a_secure_sum_has_the_central_noise_distribution() -> None:
    """Five workers each put in a discrete Gaussian of sigma / sqrt(5) steps; their 32-bit words' sum, decoded,
    carries N(0, (z clip)^2) like the coordinator's central noise, and zero updates come out as zero plus noise."""
    z, clip, n, d = 1.3, 2.0, 5, 60_000
    code = Encoding(clip, 1, n, HEADROOM_SIGMAS * z * clip)
    rng = np.random.default_rng(3)
    total = np.zeros(d, dtype=np.uint32)
    for _ in range(n):
        words = code.encode(np.zeros(d), 1)
        words += discrete_gaussian(rng, worker_sigma(z, clip, code.scale, n), d).astype(np.uint32)
        total += words
    decoded = code.decode(total)
    central = torch.zeros(d, dtype=torch.float64)
    add_gaussian_({"x": central}, z * clip, fresh_generator())
    for sample in (decoded, central.numpy()):
        assert sample.std() == pytest.approx(z * clip, rel=0.02) and abs(sample.mean()) < 0.06  # 5 sigma
        kurtosis = float(((sample - sample.mean()) ** 4).mean() / sample.var() ** 2)
        assert kurtosis == pytest.approx(3.0, abs=0.1)
    assert np.abs(decoded).max() < HEADROOM_SIGMAS * z * clip  # never wrapped around 2^32


def test_a_clipped_and_rounded_worker_vector_stays_within_the_bound() -> None:
    clip, n = 1.0, 3
    code = Encoding(clip, 1, n, HEADROOM_SIGMAS * 2.0 * clip)
    delta = {"a": torch.randn(5000) * 10, "b": torch.randn(7, 7)}
    layout = layout_of(delta)
    dims = 5000 + 49
    values, norm = flatten(delta, layout, distributed_clip(clip, code.scale, dims), counted=False)
    assert norm > 100 and values[-1] == 0.0
    words = code.encode(values, 1).view(np.int32).astype(np.float64)
    assert np.linalg.norm(words) <= code.scale * clip  # the integer sensitivity the noise is sized for


# -- the accountant -------------------------------------------------------------------------------------------------

def test_epsilon_is_the_libraries_for_the_same_mechanism() -> None:
    ours = epsilon([Release(0.1, 1.0, 100)], 1e-5)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 100))
    assert ours == acc.get_epsilon(1e-5) == pytest.approx(7.90, abs=0.01)
    opacus = RDPAccountant()  # a second implementation: Opacus's own RDP arithmetic
    opacus.history = [(1.0, 0.1, 100)]
    assert opacus.get_epsilon(1e-5) == pytest.approx(ours, rel=0.03)
    full = epsilon([Release(1.0, 2.0, 20)], 1e-5)  # every worker in every round: no amplification
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(2.0), 20)
    assert full == acc.get_epsilon(1e-5)
    mixed = [Release(0.5, 1.5), Release(1.0, 2.0, 3), Release(0.5, 1.5, 2), Release(1.0, 9.0, 0)]
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.ComposedDpEvent([dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.5))] * 3
                                         + [dp_event.GaussianDpEvent(2.0)] * 3))
    assert epsilon(mixed, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0


def test_noise_for_a_target_spends_just_that() -> None:
    z = noise_for(3.0, 1e-5, 20, 1.0)
    assert epsilon([Release(1.0, z, 20)], 1e-5) <= 3.0 < epsilon([Release(1.0, z * 0.97, 20)], 1e-5)


def test_adaptive_clippings_split_of_the_budget_composes_to_the_chosen_multiplier() -> None:
    """Andrew et al.: the updates' noise (multiplier z_updates, sensitivity 1) and the count's (sigma_b, sensitivity
    1/2) together spend what one Gaussian of multiplier z does, as the library computes it."""
    z, sigma_b = 1.2, 1.5
    z_updates = update_noise_multiplier(z, sigma_b)
    assert z_updates > z
    both = rdp.RdpAccountant()
    both.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z_updates), dp_event.GaussianDpEvent(2 * sigma_b)]),
                 10)
    one = rdp.RdpAccountant()
    one.compose(dp_event.GaussianDpEvent(z), 10)
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-6)
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(1.0, 0.4)


def test_adaptive_clipping_follows_the_target_quantile() -> None:
    rng = np.random.default_rng(4)
    norms = list(np.exp(rng.normal(0.0, 0.5, 200)))  # median 1
    clip = 10.0
    for _ in range(200):
        clip = next_clip(clip, noisy_fraction_under(norms, clip, len(norms), 2.0, rng), 0.5, 0.2)
    assert clip == pytest.approx(float(np.median(norms)), rel=0.1)


# -- the coordinator's round ----------------------------------------------------------------------------------------

WORKERS = ("w1", "w2", "w3")


def _private_round(tmp_path: Path, size: int, std: float, **overrides: Any) -> tuple[Share, Assignment, RoundIntake]:
    s = Share(tmp_path)
    cfg = load_config("digits", {**DP, **overrides})
    open_run(s, cfg, "coordinator", coordinator_identity())
    base = {"w": torch.zeros(size), "b": torch.zeros(2)}
    ref = save_state(s.store.write, s.global_model(1), base)
    a = Assignment(format=FORMAT_VERSION, run_id="x", round=1, rounds=5, model=ref, num_shards=3, time_budget_s=60,
                   workers={w: WorkerTask(shard=i, local_epochs=1) for i, w in enumerate(WORKERS)},
                   shards=FileRef("shards/003.safetensors", "cd" * 32, 10))
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    trust = Trust(s, "x", coordinator_identity(), "tofu", lambda n: worker_identity(n).public, lambda m: None)
    trust.admit_all(WORKERS)
    plan = Budget(cfg.dp, cfg.clip_norm, []).plan(len(WORKERS), len(WORKERS))  # type: ignore[arg-type]
    rule = PrivateMean(std, plan.denominator, fresh_generator())
    return s, a, RoundIntake(s, 1, a, base, cfg, lambda a, w: Bound(1000, 1000, "test"), rule, trust,
                             lambda m: None, {}, opener=coordinator_opener(), privacy=plan)


def _close(intake: RoundIntake, size: int):  # type: ignore[no-untyped-def]
    intake.take(intake.scan())
    optimizer = make_optimizer(load_config("digits").server_settings(), frozenset({"w", "b"}))
    closing = intake.aggregate("quorum", {"w": torch.zeros(size), "b": torch.zeros(2)}, optimizer, {})
    intake.close()
    assert closing is not None
    return closing


def test_every_update_counts_once_clipped_to_the_bound_over_the_workers_assigned(tmp_path: Path) -> None:
    s, a, intake = _private_round(tmp_path, 4, 0.0)
    submit_update(s, a, "w1", {"w": torch.full((4,), 10.0), "b": torch.zeros(2)}, samples=900)  # norm 20: clipped
    submit_update(s, a, "w2", {"w": torch.full((4,), 0.1), "b": torch.zeros(2)}, samples=10)  # norm 0.2: kept
    closing = _close(intake, 4)
    # weight 1 each whatever the samples, the sum over the 3 assigned (w3 sent nothing)
    torch.testing.assert_close(closing.new_state["w"], torch.full((4,), (0.5 + 0.1) / 3))
    assert [x.weight for x in closing.accepted] == [1.0, 1.0]
    assert all(x.norm is None and not x.clipped for x in closing.accepted) and closing.clipped == {}
    assert closing.fraction_under is None


def test_the_coordinators_noise_has_the_scale_of_the_formula(tmp_path: Path) -> None:
    size, std = 200_000, 0.6
    s, a, intake = _private_round(tmp_path, size, std)
    for w in WORKERS:
        submit_update(s, a, w, {"w": torch.zeros(size), "b": torch.zeros(2)})
    moved = _close(intake, size).new_state["w"]
    assert float(moved.std()) == pytest.approx(std / 3, rel=0.01) and abs(float(moved.mean())) < 0.003


def test_adaptive_clipping_counts_the_updates_under_the_bound_with_noise(tmp_path: Path) -> None:
    s, a, intake = _private_round(tmp_path, 4, 0.0, dp={"noise_multiplier": 1.0, "adaptive_clip": True,
                                                         "clip_count_stddev": 0.6})
    assert intake.privacy is not None and intake.privacy.count_std == 0.6
    for w, v in zip(WORKERS, (0.1, 0.2, 5.0)):
        submit_update(s, a, w, {"w": torch.full((4,), v), "b": torch.zeros(2)})
    closing = _close(intake, 4)
    assert closing.fraction_under is not None and abs(closing.fraction_under - 2 / 3) < 5 * 0.6 / 3


# -- the budget ------------------------------------------------------------------------------------------------------

def _summary(r: int, record: PrivacyRecord | None) -> Summary:
    return Summary(format=2, round=r, closed_because="quorum", seconds=1.0, model=FileRef("m", "ab" * 32, 1),
                   accepted=[], rejected=[], missing=[], ignored=[], late=[], aggregation="fedavg", step_scale=1.0,
                   metrics={}, timings={}, privacy=record)


def test_the_budget_adds_up_the_summaries_and_stops_before_the_target() -> None:
    dp = DPSettings(noise_multiplier=1.0, target_epsilon=20.0)
    budget = Budget(dp, 2.0, [])
    records = []
    for r in (1, 2, 3):
        plan = budget.plan(3, 4)
        assert plan.sample_rate == 0.75 and plan.central_std == 2.0 and plan.denominator == 3
        assert budget.over_target(plan) == ""
        records.append(budget.record(plan, 1.0, 2 if r == 2 else 1))
    assert records[-1].epsilon == pytest.approx(epsilon([Release(0.75, 1.0, 4)], 1e-5), abs=1e-6)
    again = Budget(dp, 2.0, [_summary(r, x) for r, x in enumerate(records, 1)])  # a restart reads the same
    assert again.spent() == pytest.approx(budget.spent())
    why = ""
    while not why:
        plan = again.plan(4, 4)
        why = again.over_target(plan)
        if not why:
            again.record(plan, 1.0, 1)
    assert again.spent() <= 20.0 and "target_epsilon 20" in why
    assert Budget(DPSettings(noise_multiplier=1.0, amplification=False), 2.0, []).plan(3, 4).sample_rate == 1.0
    assert epsilon([*again.releases, Release(1.0, 1.0)], 1e-5) > 20.0


def test_an_adaptive_bound_carries_over_from_the_last_summary() -> None:
    dp = DPSettings(noise_multiplier=1.0, adaptive_clip=True)
    record = Budget(dp, 2.0, []).record(Budget(dp, 2.0, []).plan(3, 3), 1.0, 1, fraction_under=0.7)
    assert record.next_clip == pytest.approx(2.0 * math.exp(-0.2 * (0.7 - 0.5)), abs=1e-6)  # more under: it shrinks
    assert Budget(dp, 2.0, [_summary(1, record)]).plan(3, 3).clip == record.next_clip


# -- refused settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    ({"clip_norm": 0}, "set clip_norm"),
    ({"aggregation": "median", "min_updates": 3}, "aggregation median is not a sum"),
    ({"aggregation": "trimmed_mean", "min_updates": 3}, "aggregation trimmed_mean is not a sum"),
    ({"screen_factor": 3.0}, "screen_factor=0"),
    ({"federated_eval": 0.1}, "federated_eval=0"),
    ({"late_policy": "fold"}, "late_policy=drop"),
    ({"dp": {"noise_multiplier": 0}}, "noise_multiplier must be positive"),
    ({"dp": {"noise_multiplier": 1.0, "delta": 0.6}, "min_workers": 2}, "not below 1 / min_workers"),
    ({"dp": {"noise_multiplier": 1.0, "noise": "distributed"}}, "needs secure_aggregation: true"),
    ({"dp": {"noise_multiplier": 1.0, "adaptive_clip": True}, "secure_aggregation": True, "min_updates": 2},
     "use a fixed clip_norm with secure_aggregation"),
    ({"dp": {"noise_multiplier": 2.0, "clip_count_stddev": 0.5}}, "clip_count_stddev must exceed"),
    ({"dp": {"noise_multiplier": 1.0, "noise": "local"}}, "not one of central, distributed"),
    ({"worker_dp": {"noise_multiplier": 1.0}, "prox_mu": 0.1}, "worker_dp does not combine with prox_mu"),
])
def test_settings_that_break_the_guarantee_are_refused(overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config("digits", {**DP, **overrides})


def test_dp_lays_its_screens_under_what_the_user_sets_and_nests_set_keys() -> None:
    cfg = load_config("digits", {"model": "digits_cnn_gn", "clip_norm": 1.0, "dp.noise_multiplier": 1.1,
                                 "dp.target_epsilon": 4})
    assert cfg.dp == DPSettings(noise_multiplier=1.1, target_epsilon=4.0)
    assert (cfg.screen_factor, cfg.screen_max_ratio, cfg.clip_factor, cfg.screen_direction) == (0, 0, 0, False)


def test_a_model_with_batchnorm_and_a_target_one_round_spends_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="BatchNorm.*digits_cnn_gn"):
        check_privacy(load_config("digits", {**DP, "model": "digits_cnn"}))
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_privacy(load_config("digits", {"worker_dp": {"noise_multiplier": 1.0}}))
    with pytest.raises(ConfigError, match="spent by the first round alone"):
        check_privacy(load_config("digits", {**DP, "dp": {"noise_multiplier": 0.5, "target_epsilon": 1.0}}))
    check_privacy(load_config("digits", {**DP, "dp": {"noise_multiplier": 5.0, "target_epsilon": 1.0}}))


# -- DP-SGD on a worker ---------------------------------------------------------------------------------------------

def test_dp_sgd_trains_the_model_and_leaves_it_plain() -> None:
    model = get_task("digits").build_model("digits_cnn_gn", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Split(torch.randn(200, 1, 8, 8), torch.randint(0, 10, (200,)))
    settings = TrainSettings(epochs=1, batch_size=20, lr=0.1, momentum=0.0, weight_decay=0.0, augment=None)
    result, rate = dp_local_train(model, data, settings, 1.0, 0.5, "cpu", seed=1)
    assert (result.samples, result.steps, rate) == (200, 10, 0.1)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and all(not hasattr(p, "grad_sample") for p in model.parameters())
    with pytest.raises(ConfigError, match="BatchNorm"):
        dp_local_train(get_task("digits").build_model("digits_cnn"), data, settings, 1.0, 0.5, "cpu", seed=1)


def test_dp_sgd_with_no_noise_and_a_tiny_bound_moves_the_model_by_at_most_lr_x_bound_a_step() -> None:
    """Each example's gradient is clipped to max_grad_norm, so a step of plain SGD (noise ~0) moves the weights by at
    most lr x max_grad_norm whatever the data."""
    model = get_task("digits").build_model("digits_cnn_gn", seed=0)
    before = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
    data = Split(torch.randn(64, 1, 8, 8) * 100, torch.randint(0, 10, (64,)))
    settings = TrainSettings(epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, augment=None, steps=1)
    dp_local_train(model, data, settings, 1e-6, 0.01, "cpu", seed=2)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # the clipped sum over the drawn batch (Poisson: its size varies) divided by the expected size, 64
    assert 0 < float((after - before).norm()) <= 0.01 * 2
