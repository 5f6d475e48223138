"""A worker whose share is a FUSE mount (sshfs of a loopback sshd): inotify never sees the coordinator's
writes there, auto picks polling, and polling carries the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsync.storage.local import atomic_write
from fedsync.storage.markers import FinalMarker, Summary, parse
from fedsync.storage.medium import filesystem_type
from fedsync.storage.share import Share
from fedsync.storage.watch import ShareWatcher

from .helpers import finish, require, start
from .sshfs import SshfsMount

pytestmark = pytest.mark.processes  # real servers and fedsync processes


@pytest.fixture
def mounted(tmp_path: Path):
    require("sshfs", "apt-get install sshfs")
    require("/usr/sbin/sshd", "apt-get install openssh-server")
    source, mount = tmp_path / "A", tmp_path / "M"
    source.mkdir()
    with SshfsMount(tmp_path, source, mount):
        yield source, mount


def test_inotify_is_blind_on_fuse_and_polling_is_not(mounted) -> None:
    source, mount = mounted
    assert filesystem_type(mount) == "fuse.sshfs"
    with ShareWatcher(Share(mount), "events") as events, ShareWatcher(Share(mount), "poll", poll_interval=0.3) as poll:
        atomic_write(source / "fedsync.yaml", b"format: 1\n")  # another machine writes, as seen from the mount
        assert (mount / "fedsync.yaml").exists()
        assert poll.wait(5), "polling must see the other side's write"
        assert not events.wait(2), "inotify on FUSE saw another client's write: this mount is not remote-like"


def test_polling_carries_a_run_over_sshfs(mounted) -> None:
    source, mount = mounted
    coord = start("coordinator", "--share", str(source), "--rounds", "3", "--set", "min_workers=2")
    w1 = start("worker", "--share", str(source), "--name", "w1", "--device", "cpu")
    remote = start("worker", "--share", str(mount), "--name", "remote", "--device", "cpu", "--wait-for-run", "60")
    out = finish(coord, timeout=180)
    outs = finish(w1, timeout=60) + finish(remote, timeout=60)
    assert coord.returncode == 0 and remote.returncode == 0, out + outs
    assert "[worker remote] watching the share by polling every 1 s (" in outs and "fuse.sshfs" in outs
    s = Share(source)
    for r in (1, 2, 3):
        assert sorted(x.worker for x in parse(Summary, s.read_yaml(s.summary(r)), "s").accepted) == ["remote", "w1"]
    assert parse(FinalMarker, s.read_yaml(s.final_marker), "f").round == 3
