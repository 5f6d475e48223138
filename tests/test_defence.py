"""The screens against an enrolled attacker, on real safetensors files through the coordinator's own intake:
buffers an honest worker cannot produce (invalid_state), buffers from the median, the direction screen, clipping to
the round's median norm, and a model that is never made invalid."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.defence import Screens, at_close, on_arrival, spoiled
from fedsync.aggregation.geometry import SLICE, median_cosines
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.rules import FedAvg
from fedsync.aggregation.screening import off_direction
from fedsync.aggregation.validity import Validity, validity_of
from fedsync.fedavg import apply_delta
from fedsync.learning.models import build_model, constrained_buffers
from fedsync.storage import names
from fedsync.storage.local import LocalStore
from fedsync.storage.reasons import Reason, Unusable
from fedsync.tensors.encoding import encode
from fedsync.tensors.files import layout_of, save_state
from tests.helpers import StackedSlices

G = torch.Generator().manual_seed(3)
BASE = {"w": torch.randn(5000, generator=G), "bn.running_var": torch.rand(8, generator=G) + 0.5,
        "bn.num_batches_tracked": torch.tensor(40)}
BUFFERS = {"bn.running_var": "variance", "bn.num_batches_tracked": "count"}
PARAMETERS = frozenset({"w"})
SCREENS = Screens(screen_factor=10.0, screen_max_ratio=10.0, clip_norm=0.0, clip_factor=2.0, screen_direction=True)
DIRECTION = torch.randn(5000, generator=G)  # what honest training agrees on this round


def _honest(steps: int = 5) -> dict[str, torch.Tensor]:
    return {"w": DIRECTION * 0.01 + torch.randn(5000, generator=G) * 0.005,
            "bn.running_var": torch.randn(8, generator=G) * 0.05, "bn.num_batches_tracked": torch.tensor(steps)}


def _take(tmp: Path, updates: dict[str, dict[str, torch.Tensor]], encoding: str = "none",
          screens: Screens = SCREENS) -> tuple[Aggregator, dict[str, Unusable]]:
    """The updates taken in and screened on arrival: the aggregator and what it rejected, by worker."""
    store = LocalStore(tmp)
    agg = Aggregator(layout_of(BASE), store, round=1, validity=validity_of(BUFFERS, BASE))
    cands = [Candidate(w, f"{w}.safetensors", save_state(store.write, f"{w}.safetensors", encode(u, encoding)),
                       10.0, 1, 5, encoding) for w, u in updates.items()]
    outcomes = agg.take(cands) + on_arrival(agg, screens, 1.0)
    return agg, {o.candidate.worker: o.problem for o in outcomes if o.problem}


def test_the_constrained_buffers_of_a_model_are_its_batchnorm_variances_and_counts() -> None:
    buffers = constrained_buffers(build_model("digits_cnn", 10))
    assert buffers == {"1.running_var": "variance", "1.num_batches_tracked": "count",
                       "4.running_var": "variance", "4.num_batches_tracked": "count"}
    assert constrained_buffers(build_model("digits_mlp", 10)) == {}


def test_buffers_honest_training_cannot_produce_are_rejected_while_reading(tmp_path: Path) -> None:
    below = {**_honest(), "bn.running_var": -BASE["bn.running_var"] - 0.01}  # every variance negative
    overflow = {**_honest(), "bn.num_batches_tracked": torch.tensor(2 ** 63 - 1)}
    shrunk = {**_honest(), "bn.num_batches_tracked": torch.tensor(-3)}
    near = {**_honest(), "bn.running_var": -BASE["bn.running_var"] * 0.99}  # small but valid
    agg, rejected = _take(tmp_path, {"h1": _honest(), "below": below, "overflow": overflow, "shrunk": shrunk,
                                     "near": near})
    assert {w: p.reason for w, p in rejected.items()} == {w: Reason.INVALID_STATE
                                                          for w in ("below", "overflow", "shrunk")}
    assert "negative" in rejected["below"].detail and "9223372036854775807 in 5 local step(s)" in \
        rejected["overflow"].detail
    assert sorted(c.worker for c in agg.accepted) == ["h1", "near"]
    agg.close()


def test_a_lossy_encoding_may_round_a_tiny_variance_just_below_zero(tmp_path: Path) -> None:
    exact = {**_honest(), "bn.running_var": -BASE["bn.running_var"]}  # every variance exactly 0: valid
    agg, rejected = _take(tmp_path, {"a": exact}, "int8")
    assert rejected == {} and len(agg.accepted) == 1
    agg.close()
    check = Validity({"v": torch.tensor([1.0, 1.0], dtype=torch.float64)})
    assert check.check_piece("v", 0, torch.tensor([-1.005, 0.0]), 1, "int8") is None  # within 1/100 of |max|
    assert check.check_piece("v", 0, torch.tensor([-1.02, 0.0]), 1, "int8") is not None
    assert check.check_piece("v", 0, torch.tensor([-1.005, 0.0]), 1, "none") is not None


def test_buffers_take_the_median_so_one_update_cannot_push_them(tmp_path: Path) -> None:
    updates = {f"h{i}": _honest() for i in range(4)}
    updates["low"] = {**_honest(), "bn.running_var": -BASE["bn.running_var"] * 0.99}  # valid, shrinks all 100-fold
    agg, _ = _take(tmp_path, updates)
    got = FedAvg().aggregate(agg.collected(PARAMETERS)).delta
    stacked = torch.stack([u["bn.running_var"] for u in updates.values()]).double()
    torch.testing.assert_close(got["bn.running_var"], stacked.median(dim=0).values.float())
    torch.testing.assert_close(got["w"], torch.stack([u["w"] for u in updates.values()]).mean(dim=0))
    assert float(got["bn.num_batches_tracked"]) == 5.0
    agg.close()


def test_median_cosines_match_the_direct_computation() -> None:
    rows = [{"w": torch.randn(70000, generator=G)} for _ in range(4)]  # spans two slices
    got = median_cosines(StackedSlices(rows), {"w": 70000})
    stacked = torch.stack([r["w"] for r in rows]).double()
    med = stacked.sort(dim=0).values[1:3].mean(dim=0)
    want = [float(r @ med / (r.norm() * med.norm())) for r in stacked]
    assert got == pytest.approx(want, rel=1e-9)


def test_the_direction_screen_rejects_a_flipped_update_only_while_the_others_agree() -> None:
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 1.1, "x": 5.0}
    assert set(off_direction({"a": 0.62, "b": 0.6, "c": 0.58, "d": 0.66, "x": -0.19}, norms)) == {"x"}
    assert off_direction({"a": 0.62, "b": 0.6, "c": 0.58, "d": 0.66, "x": 0.02}, norms) == {}  # not pointing away
    assert off_direction({"a": 0.1, "b": -0.05, "c": 0.3, "d": 0.02, "x": -0.08}, norms) == {}  # late: no consensus
    assert off_direction({"a": 0.62, "b": 0.6, "c": 0.58, "d": 0.66, "x": -0.4}, {**norms, "x": 2.1}) == {}  # 2 x
    assert off_direction({"a": 0.9, "x": -0.9}, norms) == {}  # too few to tell


def test_at_the_close_a_flipped_update_is_rejected_and_a_large_one_clipped(tmp_path: Path) -> None:
    updates = {f"h{i}": _honest() for i in range(4)}
    updates["flip"] = {**_honest(), "w": -5 * _honest()["w"]}
    updates["big"] = {**_honest(), "w": 3 * _honest()["w"]}  # agrees, but three times a typical norm
    agg, rejected = _take(tmp_path, updates)
    assert rejected == {}  # the norm screen (factor 10) lets both through
    outcomes, again = at_close(agg, SCREENS, {"w": 5000})
    assert again and [(o.candidate.worker, o.problem.reason) for o in outcomes if o.problem] == \
        [("flip", Reason.OFF_DIRECTION)]
    outcomes, again = at_close(agg, SCREENS, {"w": 5000})
    assert not again and outcomes == []
    median = sorted(agg.norms.values())[2]
    assert [c.worker for c in agg.scales] == ["big"] and abs(agg.scales[next(iter(agg.scales))] * agg.norms[
        next(iter(agg.scales))] - 2 * median) < 1e-6 * median
    clipped = FedAvg().aggregate(agg.collected(PARAMETERS)).delta["w"]
    kept = [u["w"] for w, u in updates.items() if w != "flip"]
    big_norm = float(torch.cat([updates["big"]["w"], updates["big"]["bn.running_var"]]).norm())
    want = (sum(kept[:4]) + kept[4] * (2 * median / big_norm)) / 5
    torch.testing.assert_close(clipped, want, rtol=1e-5, atol=1e-7)
    agg.close()


def test_clipping_again_to_a_lower_bound_scales_from_what_counts_now(tmp_path: Path) -> None:
    updates = {f"h{i}": _honest() for i in range(3)}
    agg, _ = _take(tmp_path, updates, screens=Screens(10.0, 10.0, 0.0, 0.0, False))
    norms = {c.worker: n for c, n in agg.norms.items()}
    top = max(norms.values())
    agg.clip(top * 0.9)
    agg.clip(top * 0.5)
    got = FedAvg().aggregate(agg.collected(PARAMETERS)).delta["w"]
    want = sum(u["w"] * min(1.0, top * 0.5 / norms[w]) for w, u in updates.items()) / 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    agg.close()


def test_an_invalid_aggregate_takes_the_largest_update_out() -> None:
    validity = validity_of(BUFFERS, BASE)
    assert validity.check_state(BASE) is None
    bad = {**BASE, "bn.running_var": BASE["bn.running_var"] - 10}
    assert "negative" in validity.check_state(bad)
    assert "count" in validity.check_state({**BASE, "bn.num_batches_tracked": torch.tensor(-1)})


def test_spoiled_names_why_and_drops_the_largest(tmp_path: Path) -> None:
    updates = {"h1": _honest(), "h2": {**_honest(), "w": _honest()["w"] * 4}}
    agg, _ = _take(tmp_path, updates)
    state = apply_delta(BASE, FedAvg().aggregate(agg.collected(PARAMETERS)).delta)
    assert spoiled(agg, state, validity_of(BUFFERS, BASE)) == ([], "")
    invalid = {**state, "bn.running_var": -state["bn.running_var"]}
    outcomes, why = spoiled(agg, invalid, validity_of(BUFFERS, BASE))
    assert "not valid" in why and [(o.candidate.worker, o.problem.reason) for o in outcomes] == \
        [("h2", Reason.SPOILS_AGGREGATE)]
    agg.close()


def test_an_update_whose_file_changed_after_it_was_read_no_longer_counts(tmp_path: Path) -> None:
    """The rules and screens read accepted files again at the close: a file rewritten in between would be read
    unverified, so it is taken out first."""
    updates = {f"h{i}": _honest() for i in range(3)}
    agg, _ = _take(tmp_path, updates)
    time.sleep(0.01)
    save_state(LocalStore(tmp_path).write, "h1.safetensors", {**_honest(), "w": -100 * DIRECTION})
    outcomes, again = at_close(agg, SCREENS, {"w": 5000})
    assert again and [(o.candidate.worker, o.problem.reason) for o in outcomes] == [("h1", Reason.DUPLICATE)]
    assert sorted(c.worker for c in agg.accepted) == ["h0", "h2"]
    assert at_close(agg, SCREENS, {"w": 5000}) == ([], False)
    agg.close()


def test_an_update_written_again_with_the_same_bytes_still_counts(tmp_path: Path) -> None:
    """A sync tool that delivers a file again after a partition heals (a new inode and time, the same bytes) does not
    take an accepted update out: its bytes are still the ones its marker names."""
    updates = {f"h{i}": _honest() for i in range(3)}
    agg, _ = _take(tmp_path, updates)
    time.sleep(0.01)
    before = LocalStore(tmp_path).signature("h1.safetensors")
    same = (tmp_path / "h1.safetensors").read_bytes()
    (tmp_path / "h1.safetensors").unlink()
    (tmp_path / "h1.safetensors").write_bytes(same)
    assert LocalStore(tmp_path).signature("h1.safetensors") != before
    assert at_close(agg, SCREENS, {"w": 5000}) == ([], False)
    assert sorted(c.worker for c in agg.accepted) == ["h0", "h1", "h2"]
    agg.close()


def test_the_direction_over_a_large_model_is_measured_on_a_random_sample_of_whole_slices() -> None:
    rows = [{"w": DIRECTION.repeat(60) + torch.randn(300000, generator=G) * 0.5} for _ in range(4)]
    rows.append({"w": -5 * rows[0]["w"]})
    read: list[int] = []

    class Counting(StackedSlices):
        def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
            read.append(start)
            return super().read(tensor, start, length)

    full = median_cosines(StackedSlices(rows), {"w": 300000})
    sampled = median_cosines(Counting(rows), {"w": 300000}, sample=2 * SLICE)
    assert len(read) == 2 and all(start % SLICE == 0 for start in read)  # two whole slices of five
    assert sampled[4] < -0.5 and min(sampled[:4]) > 0.5  # the flipped one is as plain as over all of them
    assert sampled == pytest.approx(full, abs=0.05)


def test_a_file_gone_after_it_was_read_no_longer_counts_and_a_share_gone_is_waited_out(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    agg = Aggregator(layout_of(BASE), store, round=1, validity=validity_of(BUFFERS, BASE))
    (tmp_path / names.updates_dir(1)).mkdir(parents=True)
    cands = [Candidate(w, names.update_tensors(1, w), save_state(store.write, names.update_tensors(1, w), _honest()),
                       10.0, 1, 5) for w in ("a", "b", "c")]
    assert all(o.problem is None for o in agg.take(cands))
    (tmp_path / names.update_tensors(1, "b")).unlink()
    outcomes, again = at_close(agg, SCREENS, {"w": 5000})
    assert again and [(o.candidate.worker, o.problem.reason) for o in outcomes] == [("b", Reason.MISSING_FILE)]
    shutil.rmtree(tmp_path / names.round_dir(1))  # the share unmounted: nothing to judge, wait
    with pytest.raises(FileNotFoundError, match="unmounted"):
        at_close(agg, SCREENS, {"w": 5000})
    agg.close()
