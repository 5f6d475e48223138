"""FedAvg against a plain reference on random tensors, worked out without streaming."""

import pytest
import torch

from fedsync.aggregation.sums import WeightedSum
from fedsync.fedavg import apply_mean, delta
from fedsync.tensors.files import layout_of


def _random_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.randint(0, 50, (), generator=g),
        "half.weight": torch.randn(5, generator=g).half(),
    }


def test_streaming_mean_equals_reference() -> None:
    g = torch.Generator().manual_seed(0)
    base = _random_state(g)
    updates = [_random_state(g) for _ in range(7)]
    weights = [float(w) for w in torch.randint(1, 500, (7,), generator=g)]
    summed = WeightedSum(layout_of(base))
    for u, w in zip(updates, weights):
        summed.add(u, w)
    result = apply_mean(base, summed)
    total = sum(weights)
    for name, tensor in base.items():
        ref = sum(u[name].double() * w for u, w in zip(updates, weights)) / total
        if tensor.dtype.is_floating_point:
            expected = (tensor.double() + ref).to(tensor.dtype)
            atol = 1e-2 if tensor.dtype == torch.float16 else 1e-5
            torch.testing.assert_close(result[name], expected, atol=atol, rtol=1e-3)
        else:
            assert result[name].dtype == tensor.dtype
            assert int(result[name]) == int(tensor) + round(float(ref))


def test_integer_buffer_is_rounded_weighted_mean_by_hand() -> None:
    base = {"n": torch.tensor(10)}
    summed = WeightedSum(layout_of(base))
    summed.add({"n": torch.tensor(4)}, 1.0)   # 1*4 + 3*8 = 28, / 4 = 7
    summed.add({"n": torch.tensor(8)}, 3.0)
    assert int(apply_mean(base, summed)["n"]) == 17


def test_pieces_and_merged_lanes_equal_whole_updates() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(10, 3, generator=g)}
    ups = [{"w": torch.randn(10, 3, generator=g)} for _ in range(4)]
    whole = WeightedSum(layout_of(base))
    for i, u in enumerate(ups):
        whole.add(u, i + 1.0)
    lanes = [WeightedSum(layout_of(base)), WeightedSum(layout_of(base))]
    for i, u in enumerate(ups):
        flat = u["w"].reshape(-1)
        lane = lanes[i % 2]
        lane.add_piece("w", 0, flat[:7], i + 1.0)   # uneven pieces, as the file reader produces
        lane.add_piece("w", 7, flat[7:], i + 1.0)
        lane.add_weight(i + 1.0)
    lanes[0].merge(lanes[1])
    torch.testing.assert_close(apply_mean(base, lanes[0])["w"], apply_mean(base, whole)["w"])


def test_no_updates_is_an_error() -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="zero updates"):
        apply_mean(base, WeightedSum(layout_of(base)))


def test_delta_keeps_dtypes() -> None:
    base = {"w": torch.ones(2), "n": torch.tensor(3)}
    local = {"w": torch.full((2,), 1.5), "n": torch.tensor(7)}
    d = delta(local, base)
    assert d["n"].dtype == torch.int64 and int(d["n"]) == 4
    torch.testing.assert_close(d["w"], torch.full((2,), 0.5))

