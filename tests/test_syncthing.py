"""fedsync over two real Syncthing instances on 127.0.0.1: the coordinator and one worker use one copy of the
folder, a second worker uses the other copy."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedsync.storage.keys import coordinator_key_path, sealing_key_path
from fedsync.storage.markers import FinalMarker, Summary, WorkerInfo, parse
from fedsync.storage.share import Share

from .helpers import assert_sealed, finish, killed_on_error, require, run, start, wait_until
from .syncthing import SyncthingPair

pytestmark = pytest.mark.processes  # real servers and fedsync processes


@pytest.fixture(autouse=True)
def _syncthing_present() -> None:
    require("syncthing", "apt-get install syncthing")


def _conflicts(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if ".sync-conflict-" in p.name]


def _training(share: Share, name: str, r: int) -> bool:
    """The worker's own heartbeat (on its copy) says it is training round r or has just finished it."""
    try:
        info = parse(WorkerInfo, share.read_yaml(share.worker_file(name)), "w")
    except Exception:  # noqa: BLE001 - not written yet
        return False
    return info.round == r


def _worker(share: Path, name: str, *extra: str):
    return start("worker", "--share", str(share), "--name", name, "--device", "cpu", "--wait-for-run", "90", *extra)


@pytest.mark.parametrize("nudged", [False, True], ids=["watcher", "nudged"])
def test_a_run_across_two_synced_copies(tmp_path: Path, nudged: bool) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    with SyncthingPair(tmp_path, a, b) as pair:
        api = {copy: inst.fedsync_args() if nudged else [] for copy, inst in zip((a, b), pair.instances)}
        coord = start("coordinator", "--share", str(a), "--rounds", "3", "--set", "min_workers=2", *api[a])
        w1, w2 = _worker(a, "w1", *api[a]), _worker(b, "w2", *api[b])
        out = finish(coord, timeout=240)
        outs = finish(w1, timeout=60) + finish(w2, timeout=90)
        assert coord.returncode == 0 and w1.returncode == 0 and w2.returncode == 0, out + outs + pair.logs()
    s = Share(a)
    for r in (1, 2, 3):
        summary = parse(Summary, s.read_yaml(s.summary(r)), "s")
        assert sorted(x.worker for x in summary.accepted) == ["w1", "w2"], summary
        assert_sealed(Share(b), r, ["w1", "w2"])  # w2's copy holds w1's update as ciphertext only
    assert not _conflicts(a, b)
    assert run("verify", "--share", str(a), "--key", str(sealing_key_path(coordinator_key_path()))).returncode == 0
    assert parse(FinalMarker, Share(b).read_yaml(Share.final_marker), "f").round == 3  # synced back to the worker


def test_a_partition_longer_than_the_deadline(tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    sa, sb = Share(a), Share(b)
    with SyncthingPair(tmp_path, a, b) as pair:
        coord = start("coordinator", "--share", str(a), "--rounds", "6", "--set", "min_workers=2",
                      "--set", "round_timeout=8", "--set", "late_policy=fold",
                      "--set", "max_staleness=4")
        w1, w2 = _worker(a, "w1"), _worker(b, "w2")
        with killed_on_error(coord, w1, w2):
            wait_until(lambda: _training(sb, "w2", 2), 120, "w2 to start round 2 on the far copy")
            pair.pause()  # w2 has its round; its update cannot come back
            wait_until(lambda: sa.exists(sa.summary(2)), 60, "round 2 to close at its deadline")
            time.sleep(1)
            pair.resume()
            pair.wait_connected(60)
            pair.rescan()
        out = finish(coord, timeout=240)
        outs = finish(w1, timeout=60) + finish(w2, timeout=90)
        assert coord.returncode == 0, out + outs + pair.logs()
    s2 = parse(Summary, sa.read_yaml(sa.summary(2)), "s2")
    assert s2.closed_because == "deadline" and [x.worker for x in s2.accepted] == ["w1"]
    late = [x for r in range(3, 7) for x in parse(Summary, sa.read_yaml(sa.summary(r)), "s").late]
    assert [(x.worker, x.round, x.outcome) for x in late] == [("w2", 2, "folded")], (late, out, outs)
    assert parse(FinalMarker, sa.read_yaml(sa.final_marker), "f").round == 6
    assert not _conflicts(a, b)


def test_nudge_errors_are_clear(tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    with SyncthingPair(tmp_path, a, b) as pair:
        url = f"http://127.0.0.1:{pair.instances[0].gui_port}"
        no_key = run("coordinator", "--share", str(a), "--syncthing", url)
        assert no_key.returncode == 5 and "API key" in no_key.stderr
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        wrong = run("coordinator", "--share", str(elsewhere), "--syncthing", url, "--syncthing-key",
                    pair.instances[0].api_key)
        assert wrong.returncode == 5 and "shares no folder" in wrong.stderr, wrong.stderr
        assert not (a / "fedsync.yaml").exists() and not list(elsewhere.iterdir())  # refused before writing
