"""The test that keeps docs/PROTOCOL.md complete: a worker written from the document alone
(tests/independent_worker.py, which imports nothing from fedsync) joins a real run beside a fedsync worker and
has its update accepted every round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fedsync.storage.markers import FinalMarker, Summary
from fedsync.storage.share import Share

from .conftest import finish, killed_on_error, start

SCRIPT = Path(__file__).resolve().parent / "independent_worker.py"


def test_a_worker_written_from_the_protocol_alone_is_accepted_every_round(share: Path, tmp_path: Path) -> None:
    assert not re.search(r"^\s*(from|import)\s+(fedsync|tests)\b", SCRIPT.read_text(), re.M)
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "min_workers=2")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    outsider = subprocess.Popen([sys.executable, str(SCRIPT), str(share), "outsider", str(tmp_path / "outsider.pem")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    with killed_on_error(coord, worker, outsider):
        out = finish(coord, timeout=180)
        outs = finish(worker, timeout=30) + finish(outsider, timeout=30)
    assert coord.returncode == 0 and worker.returncode == 0 and outsider.returncode == 0, out + outs
    s = Share(share)
    for r in (1, 2, 3):
        summary = s.read_record(Summary, s.summary(r))
        assert [x.worker for x in summary.accepted] == ["outsider", "w1"], (summary.rejected, out)
    assert s.read_record(FinalMarker, s.final_marker).test_accuracy >= 0.9, out
