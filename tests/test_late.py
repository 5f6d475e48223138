"""An update that arrives after its round closed: recorded as late in the next summary, then dropped or
folded into that round's aggregate with its staleness weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsync.markers import Assignment, Summary, UpdateMarker, parse
from fedsync.share import Share, read_yaml
from fedsync.tensorfile import load_verified

from .conftest import finish, killed_on_error, register_worker, start, submit_update, wait_until



@pytest.mark.parametrize("policy", ["fold", "drop"])
def test_late_update(share: Path, policy: str) -> None:
    s = Share(share)
    register_worker(s, "slow")
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "min_workers=2",
                  "--set", "round_timeout=3", "--set", f"late_policy={policy}", "--set", "worker_timeout=60")
    fast = start("worker", "--share", str(share), "--name", "fast", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, fast):
        wait_until(lambda: s.assignment(2).exists(), 90, "round 1 to close at its deadline and round 2 to open")
        a1 = parse(Assignment, read_yaml(s.assignment(1)), "a1")
        base1 = load_verified(s.global_model(1), a1.model)
        late_delta = {k: (torch.randn(v.shape) * 1e-2).to(v.dtype) if v.is_floating_point() else torch.zeros_like(v)
                      for k, v in base1.items()}
        submit_update(s, a1, "slow", late_delta, samples=300)
    out = finish(coord, timeout=90)
    finish(fast, timeout=30)
    assert coord.returncode == 0, out

    s1 = parse(Summary, read_yaml(s.summary(1)), "s1")
    assert s1.closed_because == "deadline" and s1.missing == ["slow"]
    s2 = parse(Summary, read_yaml(s.summary(2)), "s2")
    outcome = "folded" if policy == "fold" else "dropped"
    assert [(x.worker, x.round, x.outcome) for x in s2.late] == [("slow", 1, outcome)]
    assert [x.worker for x in s2.accepted] == ["fast"]

    a2 = parse(Assignment, read_yaml(s.assignment(2)), "a2")
    base2 = load_verified(s.global_model(2), a2.model)
    m = parse(UpdateMarker, read_yaml(s.update_marker(2, "fast")), "m")
    fast_delta = load_verified(s.update_tensors(2, "fast"), m.tensors)
    after = load_verified(s.final_model, s2.model)
    late_weight = 300 * 2 ** -0.5 if policy == "fold" else 0.0
    assert s2.late[0].weight == pytest.approx(late_weight, abs=1e-4)
    total = m.samples + late_weight
    for k, v in base2.items():
        if not v.is_floating_point():
            continue
        expected = v.double() + (fast_delta[k].double() * m.samples + late_delta[k].double() * late_weight) / total
        torch.testing.assert_close(after[k].double(), expected, atol=1e-6, rtol=1e-5)
