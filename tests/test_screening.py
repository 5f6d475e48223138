"""Screening and a model that never becomes non-finite: the norms the intake measures while it reads, the
bounds that reject outliers, taking an accepted update back out, and metrics that may be NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.geometry import SLICE
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.rules import FedAvg, Median, TrimmedMean, trimmed
from fedsync.aggregation.screening import outliers
from fedsync.fedavg import apply_delta, l2_norm
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FORMAT_VERSION, FileRef, Summary, parse, to_dict
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.yamlfile import dump_yaml, parse_yaml
from fedsync.tensors.files import layout_of, save_state

G = torch.Generator().manual_seed(1)
BASE = {"w": torch.randn(3000, generator=G), "b": torch.randn(10, generator=G), "n": torch.tensor(4)}


def _update(scale: float = 0.01) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3000, generator=G) * scale, "b": torch.randn(10, generator=G) * scale,
            "n": torch.tensor(2)}


def test_bounds() -> None:
    honest = {"a": 1.0, "b": 1.3, "c": 0.8}
    assert outliers(honest, model_norm=10.0, factor=5.0, max_ratio=10.0) == {}
    assert set(outliers({**honest, "x": 6.0}, 10.0, 5.0, 10.0)) == {"x"}  # 6 > 5 x median 1.15
    assert "screen_max_ratio" in outliers({"a": 1.0, "x": 101.0}, 10.0, 5.0, 10.0)["x"]  # two updates: absolute
    assert set(outliers({"a": 1.0, "x": math.inf}, 10.0, 5.0, 10.0)) == {"x"}
    assert outliers({"a": 1.0, "x": 101.0}, 10.0, 5.0, 0.0) == {}  # 0 turns a bound off
    assert outliers({**honest, "x": 6.0}, 10.0, 0.0, 10.0) == {}


def _candidates(tmp: Path, updates: dict[str, dict[str, torch.Tensor]]) -> list[Candidate]:
    store = LocalStore(tmp)
    return [Candidate(w, f"{w}.safetensors", save_state(store.write, f"{w}.safetensors", u), 10.0)
            for w, u in updates.items()]


def _model(agg: Aggregator) -> dict[str, torch.Tensor]:
    return apply_delta(BASE, FedAvg().aggregate(agg.collected(frozenset())).delta)


@pytest.mark.parametrize("bad", ["scaled", "huge"])
def test_an_outlier_taken_back_out_leaves_exactly_the_others(tmp_path: Path, bad: str) -> None:
    honest = {f"h{i}": _update() for i in range(3)}
    attack = {k: v * 1000 for k, v in _update().items()} if bad == "scaled" else \
        {k: torch.full_like(v, 1e38) if v.is_floating_point() else v for k, v in _update().items()}
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    outcomes = agg.take(_candidates(tmp_path, {**honest, "bad": attack}))
    assert all(o.problem is None for o in outcomes)  # well-formed and finite: the intake takes it
    norms = {c.worker: n for c, n in agg.norms.items()}
    for w, u in honest.items():
        assert norms[w] == pytest.approx(l2_norm(u), rel=1e-5)
    found = outliers(agg.norms, l2_norm(BASE), 5.0, 10.0)
    assert [c.worker for c in found] == ["bad"]
    dropped = agg.drop({c: Unusable(Reason.NORM_OUTLIER, why) for c, why in found.items()})
    assert [(o.candidate.worker, o.problem.reason) for o in dropped] == [("bad", Reason.NORM_OUTLIER)]
    reference = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    reference.take(_candidates(tmp_path, honest))
    got, expected = _model(agg), _model(reference)
    for k in BASE:
        assert torch.isfinite(got[k].double()).all() and torch.equal(got[k], expected[k])
    agg.close(), reference.close()


def test_dropping_after_collecting_gives_the_same_sums_again(tmp_path: Path) -> None:
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    agg.take(_candidates(tmp_path, {f"h{i}": _update() for i in range(4)}))
    first = _model(agg)  # consumes the lanes' sums
    assert agg.drop({}) == []  # dropping nothing after collecting rebuilds every lane
    again = _model(agg)
    assert all(torch.equal(first[k], again[k]) for k in BASE)
    agg.close()


def test_metrics_may_be_nan_or_infinite_everything_else_may_not() -> None:
    s = Summary(format=FORMAT_VERSION, round=1, closed_because="quorum", seconds=1.0,
                model=FileRef("0002/global.safetensors", "ab" * 32, 10), accepted=[], rejected=[], missing=[],
                ignored=[], late=[], aggregation="fedavg", step_scale=1.0,
                metrics={"test_accuracy": 0.1, "test_loss": math.nan, "train_loss": math.inf}, timings={})
    back = parse(Summary, parse_yaml(dump_yaml(to_dict(s))), "summary")
    assert math.isnan(back.metrics["test_loss"]) and back.metrics["train_loss"] == math.inf
    data = to_dict(s)
    data["seconds"] = math.nan
    with pytest.raises(ValueError, match="seconds"):
        parse(Summary, parse_yaml(dump_yaml(data)), "summary")


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.25), TrimmedMean(0.1)])
@pytest.mark.parametrize("n", [4, 5])
def test_coordinate_rules_combine_every_coordinate_across_the_files(tmp_path: Path, rule, n: int) -> None:
    """Median and trimmed mean through the seam the coordinator uses, against torch on the whole tensors; the
    tensor spans several slices, so slice edges are crossed."""
    base = {"w": torch.zeros(2 * SLICE + 7), "n": torch.tensor(0)}
    updates = {f"u{i}": {"w": torch.randn(2 * SLICE + 7, generator=G), "n": torch.tensor(i)} for i in range(n)}
    store = LocalStore(tmp_path)
    cands = [Candidate(w, f"{w}.safetensors", save_state(store.write, f"{w}.safetensors", u), float(10 * (i + 1)))
             for i, (w, u) in enumerate(updates.items())]
    agg = Aggregator(layout_of(base), store)
    agg.take(cands)
    got = apply_delta(base, rule.aggregate(agg.collected(frozenset({"w"}))).delta)
    agg.close()
    for name in ("w", "n"):
        stacked = torch.stack([u[name].double().reshape(-1) for u in updates.values()]).sort(dim=0).values
        if isinstance(rule, Median):
            expected = stacked[n // 2] if n % 2 else (stacked[n // 2 - 1] + stacked[n // 2]) / 2
        else:
            cut = max(1, int(rule.trim * n))
            expected = stacked[cut:n - cut].mean(dim=0)
        if name == "n":  # an integer buffer: the combined value, rounded, in its own dtype
            assert got["n"].dtype == torch.int64 and int(got["n"]) == int(expected.round())
        else:  # samples do not weigh: each update counts once
            torch.testing.assert_close(got["w"].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", [FedAvg(), Median()])
def test_clipping_scales_each_large_update_to_the_bound_and_survives_a_rebuild(tmp_path: Path, rule) -> None:
    """With clip_norm, an update over the bound counts as itself x bound / norm (floating tensors only; integer
    buffers untouched), for the streamed mean and the coordinate rules alike, also after its lane is rebuilt."""
    updates = {"small": _update(0.01), "big": _update(1.0), "other": _update(0.01), "gone": _update(0.01)}
    norms = {w: l2_norm(u) for w, u in updates.items()}
    bound = 3 * norms["small"]
    assert norms["big"] > bound > max(norms["small"], norms["other"])
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    cands = {c.worker: c for c in _candidates(tmp_path, updates)}
    agg.take(list(cands.values()))
    assert agg.clip(bound) == [] and [c.worker for c in agg.scales] == ["big"]
    assert agg.clip(bound) == []  # clipped once, not again
    agg.drop({cands["gone"]: Unusable(Reason.NORM_OUTLIER, "test")})  # rebuilds the lane that held it
    kept = {w: u for w, u in updates.items() if w != "gone"}
    scaled = {w: {k: v * (bound / norms[w]) if v.is_floating_point() and norms[w] > bound else v
                  for k, v in u.items()} for w, u in kept.items()}
    got = apply_delta(BASE, rule.aggregate(agg.collected(frozenset({"w", "b"}))).delta)
    agg.close()
    for k in ("w", "b"):
        stacked = torch.stack([u[k].double() for u in scaled.values()])
        expected = stacked.mean(dim=0) if isinstance(rule, FedAvg) else stacked.median(dim=0).values
        torch.testing.assert_close(got[k].double(), BASE[k].double() + expected, rtol=1e-5, atol=1e-6)
    assert int(got["n"]) == int(BASE["n"]) + 2  # the buffer: every update says 2, clipped or not


def test_trimmed_mean_cuts_at_least_one_value_at_each_end_while_one_stays() -> None:
    """trim 0.1 of 5 updates is 0.5 values: cut one at each end (before, none: a trimmed mean that was FedAvg)."""
    assert [trimmed(0.1, n) for n in range(1, 8)] == [0, 0, 1, 1, 1, 1, 1]
    assert [trimmed(0.25, n) for n in (8, 9, 12)] == [2, 2, 3]
    assert trimmed(0.0, 9) == 0 and trimmed(0.5, 4) == 1 and trimmed(0.5, 5) == 2
    column = torch.tensor([[-50.0], [1.0], [2.0], [3.0], [1000.0]])  # one attacker of five at each end
    assert TrimmedMean(0.1).combine(column).item() == 2.0
