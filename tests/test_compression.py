"""Compressed updates (bf16, int8 blocks with their own scales) on real safetensors files: what readers decode, what
the coordinator's intake and coordinate-wise rules take in, forged encodings, and the worker's error feedback across
rounds and restarts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.geometry import SLICE
from fedsync.aggregation.intake import PIECE_BYTES, Aggregator
from fedsync.aggregation.rules import FedAvg, Median
from fedsync.aggregation.sums import WeightedSum
from fedsync.fedavg import mean_delta
from fedsync.learning.models import build_model
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Reason
from fedsync.tensors.encoding import BLOCK, decode, dequantize, encode, quantize, scale_name
from fedsync.tensors.files import layout_of, state_bytes
from fedsync.tensors.residuals import ErrorFeedback

G = torch.Generator().manual_seed(3)
# one tensor longer than a read piece and than a median's slice, and not a whole number of blocks
BASE = {"big": torch.zeros(PIECE_BYTES + SLICE + 77), "small": torch.zeros(3, 5), "n": torch.tensor(0)}


def _update(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"big": torch.randn(BASE["big"].shape, generator=G) * scale,
            "small": torch.randn(3, 5, generator=G) * scale, "n": torch.tensor(4)}


def _candidate(tmp: Path, name: str, data: bytes, encoding: str, weight: float = 1.0) -> Candidate:
    (tmp / f"{name}.safetensors").write_bytes(data)
    return Candidate(name, f"{name}.safetensors", FileRef(f"{name}.safetensors", hash_bytes(data), len(data)),
                     weight, encoding=encoding)


def test_int8_blocks_hold_every_value_within_half_a_step_and_zero_blocks_stay_zero() -> None:
    x = torch.randn(3 * BLOCK + 10, generator=G)
    x[BLOCK:2 * BLOCK] = 0.0
    q, scales = quantize(x)
    assert q.dtype == torch.int8 and scales.shape == (4,) and int(q.abs().max()) == 127
    back = dequantize(q, scales)
    step = scales.repeat_interleave(BLOCK)[:x.numel()]
    assert bool(((back - x).abs() <= step / 2 + 1e-7).all())
    assert bool((back[BLOCK:2 * BLOCK] == 0).all()) and float(scales[1]) == 0.0


def test_int8_moves_at_most_0_27_of_the_bytes_of_float32_for_the_builtin_models() -> None:
    for model in ("digits_cnn", "resnet18_cifar"):
        state = build_model(model, 10).state_dict()
        plain, int8 = len(state_bytes(state)), len(state_bytes(encode(state, "int8")))
        bf16 = len(state_bytes(encode(state, "bf16")))
        assert int8 / plain <= 0.27 and bf16 / plain <= 0.51, (model, int8 / plain, bf16 / plain)


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_the_intake_and_the_median_see_the_decoded_values(tmp_path: Path, encoding: str) -> None:
    updates = [_update(s) for s in (1.0, 0.5, 2.0)]
    decoded = [decode(encode(u, encoding), encoding, BASE) for u in updates]
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    try:
        outcomes = agg.take([_candidate(tmp_path, f"w{i}", state_bytes(encode(u, encoding)), encoding, 1.0 + i)
                             for i, u in enumerate(updates)])
        assert [o.problem for o in outcomes] == [None, None, None]
        expected = WeightedSum(layout_of(BASE))
        for i, d in enumerate(decoded):
            expected.add(d, 1.0 + i)
        got = FedAvg().aggregate(agg.collected(frozenset(BASE))).delta
        for k, v in mean_delta(expected).items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
        norms = sorted(agg.norms.values())  # screening measures what the coordinator would add
        want = sorted(float(torch.cat([d["big"], d["small"].reshape(-1)]).double().norm()) for d in decoded)
        assert norms == pytest.approx(want, rel=1e-5)
        median = Median().aggregate(agg.collected(frozenset({"big", "small"}))).delta
        torch.testing.assert_close(median["big"], torch.stack([d["big"] for d in decoded]).median(dim=0).values)
    finally:
        agg.close()


def _safetensors(tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """A safetensors file with its data in exactly this order (the library orders by dtype size, then name)."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors:
        raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.int8: "I8", torch.float32: "F32", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def test_forged_int8_files_are_rejected_with_their_reason(tmp_path: Path) -> None:
    enc = encode(_update(), "int8")
    ordered = sorted(enc.items(), key=lambda kv: (kv[1].dtype != torch.int8, kv[0]))  # values before their scales
    cases = {"values_first": _safetensors(ordered)}
    for bad in (float("nan"), -1.0):
        forged = dict(enc)
        forged[scale_name("small")] = enc[scale_name("small")].clone()
        forged[scale_name("small")][0] = bad
        cases[f"scale_{bad}"] = state_bytes(forged)
    agg = Aggregator(layout_of(BASE), LocalStore(tmp_path))
    try:
        for name, data in cases.items():
            (outcome,) = agg.take([_candidate(tmp_path, name, data, "int8")])
            assert outcome.problem is not None and outcome.problem.reason == Reason.BAD_ENCODING, (name, outcome)
        # an int8 file read as if it were plain: its tensors are not the model's
        (outcome,) = agg.take([_candidate(tmp_path, "mislabelled", state_bytes(enc), "none")])
        assert outcome.problem is not None and outcome.problem.reason == Reason.EXTRA_TENSOR
        assert agg.accepted == []
    finally:
        agg.close()


def test_error_feedback_delays_what_int8_loses_and_survives_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "residuals"
    said: list[str] = []
    feedback = ErrorFeedback(folder, "run", "w1", said.append)
    meant = [_update(0.01) for _ in range(4)]
    sent = [decode(feedback.encode(r, u, "int8"), "int8", BASE) for r, u in enumerate(meant, 1)]
    assert sorted(p.name for p in folder.iterdir()) == ["run-w1-r000003.safetensors", "run-w1-r000004.safetensors"]
    _, left = ErrorFeedback(folder, "run", "w1", said.append).carried(5)  # a new process reads what was left
    for k in ("big", "small"):  # everything meant arrived but the last residual: sum(sent) + left == sum(meant)
        torch.testing.assert_close(sum(s[k] for s in sent) + left[k], sum(u[k] for u in meant), rtol=0, atol=1e-6)
    without = sum(decode(encode(u, "int8"), "int8", BASE)["big"] for u in meant)
    assert float((without - sum(u["big"] for u in meant)).abs().max()) > 1e-5  # without feedback the error stays
    # round 4 redone after a crash (its update never got out): it starts again from the residual it started from
    redo = decode(ErrorFeedback(folder, "run", "w1", said.append).encode(4, meant[3], "int8"), "int8", BASE)
    torch.testing.assert_close(redo["big"], sent[3]["big"])
    # another run's files are not this run's; a damaged file is said and the one before it used
    assert ErrorFeedback(folder, "other-run", "w1", said.append).carried(5) == (None, {})
    (folder / "run-w1-r000004.safetensors").write_bytes(b"not safetensors")
    assert ErrorFeedback(folder, "run", "w1", said.append).carried(5)[0] == 3
    assert len(said) == 1 and "run-w1-r000004.safetensors cannot be used" in said[0]
