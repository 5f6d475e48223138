"""The coordinator's intake on real safetensors files: each test breaks one thing and expects one reason."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsync.aggregation import geometry
from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.intake import PIECE_BYTES, Aggregator, intake_lanes, running_sum_bytes
from fedsync.aggregation.rules import FedAvg
from fedsync.aggregation.sums import WeightedSum
from fedsync.base.machine import cores
from fedsync.fedavg import apply_delta, apply_mean
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Reason
from fedsync.tensors.files import layout_of

G = torch.Generator().manual_seed(0)
# One tensor spans several read pieces, so a fault can land after part of the file was already summed.
BASE = {"big": torch.zeros(3 * PIECE_BYTES // 4 + 5), "small": torch.zeros(3, 4), "n": torch.tensor(0)}


def _update() -> dict[str, torch.Tensor]:
    return {"big": torch.randn(BASE["big"].shape, generator=G), "small": torch.randn(3, 4, generator=G),
            "n": torch.tensor(6)}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> FileRef:
    save_file(tensors, str(path))
    data = path.read_bytes()
    return FileRef(path.name, hash_bytes(data), len(data))


def _candidate(tmp: Path, name: str, tensors: dict, weight: float = 10.0) -> Candidate:
    path = tmp / f"{name}.safetensors"
    return Candidate(name, path.name, _write(path, tensors), weight)


def _expected(updates: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    s = WeightedSum(layout_of(BASE))
    for u, w in updates:
        s.add(u, w)
    return apply_mean(BASE, s)


def _result(agg: Aggregator) -> dict[str, torch.Tensor]:
    """The next global model through the seam the coordinator uses: FedAvg's delta, the plain server step."""
    return apply_delta(BASE, FedAvg().aggregate(agg.collected(frozenset({"big", "small"}))).delta)


def _reason(tmp: Path, cand: Candidate) -> Reason | None:
    agg = Aggregator(layout_of(BASE), LocalStore(tmp))
    try:
        (outcome,) = agg.take([cand])
    finally:
        agg.close()
    return outcome.problem.reason if outcome.problem else None


def test_good_updates_give_the_reference_mean(tmp_path: Path) -> None:
    ups = [(_update(), float(w)) for w in (5, 10, 20, 7, 3)]
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    outcomes = agg.take([_candidate(tmp_path, f"w{i}", u, w) for i, (u, w) in enumerate(ups[:2])])
    outcomes += agg.take([_candidate(tmp_path, f"w{i}", u, w) for i, (u, w) in enumerate(ups[2:], 2)])
    assert all(o.problem is None for o in outcomes) and len(agg.accepted) == 5
    result = _result(agg)
    for k, v in _expected(ups).items():
        torch.testing.assert_close(result[k], v)


def _bad_file_cases() -> dict[str, tuple]:
    def write_bytes(data: bytes):
        return lambda p: p.write_bytes(data)

    def truncated(p: Path) -> None:
        save_file(_update(), str(p))
        p.write_bytes(p.read_bytes()[:-100])

    def torch_save(p: Path) -> None:
        torch.save(_update(), p)

    def with_tensors(change):
        def make(p: Path) -> None:
            u = _update()
            change(u)
            save_file(u, str(p))
        return make

    return {
        "random bytes": (write_bytes(bytes(range(256)) * 64), Reason.NOT_SAFETENSORS),
        "pickle": (write_bytes(pickle.dumps({"big": [1.0] * 10})), Reason.NOT_SAFETENSORS),
        "torch.save": (torch_save, Reason.NOT_SAFETENSORS),
        "missing tensor": (with_tensors(lambda u: u.pop("small")), Reason.MISSING_TENSOR),
        "extra tensor": (with_tensors(lambda u: u.update(evil=torch.ones(2))), Reason.EXTRA_TENSOR),
        "wrong shape": (with_tensors(lambda u: u.update(small=torch.ones(4, 3))), Reason.WRONG_SHAPE),
        "wrong dtype": (with_tensors(lambda u: u.update(small=torch.ones(3, 4, dtype=torch.float64))),
                        Reason.WRONG_DTYPE),
        "nan late in a big tensor": (with_tensors(lambda u: u["big"].__setitem__(-1, float("nan"))),
                                     Reason.NON_FINITE),
        "inf": (with_tensors(lambda u: u["small"].__setitem__((0, 0), float("inf"))), Reason.NON_FINITE),
        "truncated": (truncated, None),  # marker describes the whole file: size mismatch
    }


@pytest.mark.parametrize("case", list(_bad_file_cases()))
def test_bad_file_is_rejected_with_its_reason(tmp_path: Path, case: str) -> None:
    make, reason = _bad_file_cases()[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    data = path.read_bytes()
    ref = FileRef(path.name, hash_bytes(data), len(data))
    if case == "truncated":
        ref = FileRef(path.name, ref.blake3, len(data) + 100)
        reason = Reason.SIZE_MISMATCH
    assert _reason(tmp_path, Candidate("bad", path.name, ref, 1.0)) == reason


def test_hash_mismatch_and_missing_file_waits(tmp_path: Path) -> None:
    good = _candidate(tmp_path, "w", _update())
    flipped = bytearray((tmp_path / good.name).read_bytes())
    flipped[-1] ^= 0xFF
    (tmp_path / good.name).write_bytes(bytes(flipped))
    assert _reason(tmp_path, good) == Reason.HASH_MISMATCH
    missing = Candidate("m", "absent.safetensors", good.ref, 1.0)
    assert _reason(tmp_path, missing) == Reason.MISSING_FILE
    assert Reason.HASH_MISMATCH.waits and not Reason.NON_FINITE.waits


def test_header_garbage_with_wrong_hash_waits_instead_of_rejecting(tmp_path: Path) -> None:
    """A file that does not match its marker's hash may be a partial copy: never judged on its content."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 4096)  # what NFS can show before the content arrives
    ref = FileRef(path.name, "cd" * 32, 4096)
    assert _reason(tmp_path, Candidate("w", path.name, ref, 1.0)) == Reason.HASH_MISMATCH


def test_partly_added_bad_files_leave_exactly_the_valid_aggregate(tmp_path: Path) -> None:
    good = [(_update(), float(w)) for w in (4, 9, 16)]
    nan_late = _update()
    nan_late["big"][-1] = float("nan")  # found after most of 'big' was summed into its lane
    corrupted = _candidate(tmp_path, "corrupt", _update(), 50.0)
    raw = bytearray((tmp_path / corrupted.name).read_bytes())
    raw[-3] ^= 0x01  # the hash fails only at the very end, after everything was summed
    (tmp_path / corrupted.name).write_bytes(bytes(raw))
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    cands = [_candidate(tmp_path, "g0", *good[0]), _candidate(tmp_path, "nan", nan_late, 30.0), corrupted,
             _candidate(tmp_path, "g1", *good[1]), _candidate(tmp_path, "g2", *good[2])]
    outcomes = {o.candidate.worker: o for o in agg.take(cands)}
    assert outcomes["nan"].problem.reason == Reason.NON_FINITE
    assert outcomes["corrupt"].problem.reason == Reason.HASH_MISMATCH
    assert sorted(c.worker for c in agg.accepted) == ["g0", "g1", "g2"]
    result = _result(agg)
    assert all(torch.isfinite(v.float()).all() for v in result.values())
    for k, v in _expected(good).items():
        torch.testing.assert_close(result[k], v)


def test_update_changed_after_acceptance_is_dropped_on_rebuild(tmp_path: Path) -> None:
    a, b = _update(), _update()
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path), lanes=1)
    first = _candidate(tmp_path, "a", a, 2.0)
    assert agg.take([first])[0].problem is None
    (tmp_path / first.name).write_bytes(b"changed under us")  # its writer broke the one-writer rule
    bad = _update()
    bad["small"][0, 0] = float("nan")
    outcomes = agg.take([_candidate(tmp_path, "nan", bad), _candidate(tmp_path, "b", b, 3.0)])
    # the NaN file forces a rebuild of the lane, which finds that 'a' no longer verifies
    assert [o.candidate.worker for o in outcomes if o.problem] == ["nan", "a"]
    result = _result(agg)
    for k, v in _expected([(b, 3.0)]).items():
        torch.testing.assert_close(result[k], v)


def test_coordinate_rules_read_aligned_slices_of_every_accepted_file(tmp_path: Path) -> None:
    """The seam a median or trimmed mean reads through: element i of every accepted update, a slice at a time."""
    ups = [_update() for _ in range(3)]
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    agg.take([_candidate(tmp_path, f"w{i}", u) for i, u in enumerate(ups)])
    slices = agg.collected(frozenset()).slices
    order = [int(c.worker[1:]) for c in agg.accepted]
    assert slices.count() == 3
    start, length = PIECE_BYTES // 4 - 3, 1000  # across a read piece's edge
    got = slices.read("big", start, length)
    assert torch.equal(got, torch.stack([ups[i]["big"][start:start + length] for i in order]))
    assert torch.equal(slices.read("small", 4, 8), torch.stack([ups[i]["small"].view(-1)[4:] for i in order]))
    assert torch.equal(slices.read("n", 0, 1), torch.stack([ups[i]["n"].view(1) for i in order]))


def test_the_intake_gives_one_mean_on_any_number_of_lanes(tmp_path: Path) -> None:
    ups = [(_update(), float(w)) for w in (5, 10, 20, 7, 3, 11, 2)]
    cands = [_candidate(tmp_path, f"w{i}", u, w) for i, (u, w) in enumerate(ups)]
    expected = _expected(ups)
    for lanes in (1, 3, 7, 9):  # 9: more lanes than updates, two of them idle
        agg = Aggregator(layout_of(BASE), LocalStore(tmp_path), lanes=lanes)
        assert len(agg.lanes) == lanes
        assert all(o.problem is None for o in agg.take(cands))
        assert sum(1 for lane in agg.lanes if lane.accepted) == min(lanes, len(ups))
        result = _result(agg)
        agg.close()
        for k, v in expected.items():
            torch.testing.assert_close(result[k], v)


def test_intake_lanes_follow_the_cores_while_their_sums_fit_a_quarter_of_free_memory() -> None:
    resnet = running_sum_bytes({"w": (torch.float32, (11_700_000,))})
    assert resnet == 46_800_000
    assert running_sum_bytes({"n": (torch.int64, (3,)), "h": (torch.float16, (8,))}) == 3 * 8 + 8 * 4
    assert intake_lanes(resnet, 16, 64 << 30) == 16  # a workstation: a lane per core
    assert intake_lanes(resnet, 2, 64 << 30) == 2
    assert intake_lanes(4 << 30, 16, 64 << 30) == 4  # a 1 B-parameter model: four sums are 16 GiB, a quarter
    assert intake_lanes(4 << 30, 16, 8 << 30) == 1  # not even one fits: one lane still reads
    assert intake_lanes(resnet, 16, 0) == 1
    agg = Aggregator(layout_of(BASE), LocalStore(Path("/nonexistent")))  # nothing read: the lanes are only counted
    assert 1 <= len(agg.lanes) <= cores()
    agg.close()


def test_slice_passes_give_the_same_geometry_on_any_number_of_cores(tmp_path: Path, monkeypatch) -> None:
    cands = [_candidate(tmp_path, f"w{i}", _update(), 10.0) for i in range(5)]
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path), lanes=2)
    agg.take(cands)
    tensors = {"big": BASE["big"].numel(), "small": 12}
    seen = []
    for n in (1, 2, 5):
        monkeypatch.setattr(geometry, "cores", lambda n=n: n)
        seen.append((geometry.distances(agg.slices(), tensors), geometry.median_cosines(agg.slices(), tensors)))
    agg.close()
    for d, cos in seen[1:]:
        torch.testing.assert_close(d, seen[0][0], rtol=1e-9, atol=0.0)
        assert cos == pytest.approx(seen[0][1], rel=1e-12)
