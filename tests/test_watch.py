"""Watching fits the medium: mount types decide auto, and both real watchers wake on real writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsync.storage.local import atomic_write
from fedsync.storage.markers import FinalMarker, parse
from fedsync.storage.medium import choose_mode, filesystem_type
from fedsync.storage.share import Share
from fedsync.storage.watch import ShareWatcher

from .helpers import finish, start

MOUNTINFO = """\
27 1 252:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/fed rw,relatime - nfs4 server:/export rw,vers=4.2
41 27 0:51 / /mnt/smb share rw - cifs //nas/share rw
42 27 0:52 / /mnt/ssh rw - fuse.sshfs me@box:/data rw
43 27 8:17 / /mnt/usb rw - fuseblk /dev/sdb1 rw
44 27 0:53 / /mnt/my\\040share rw - nfs server:/x rw
"""


@pytest.mark.parametrize("path, fstype, mode", [
    ("/home/me/rounds", "ext4", "events"), ("/mnt/fed/rounds", "nfs4", "poll"), ("/mnt/smb", "cifs", "poll"),
    ("/mnt/ssh/a/b", "fuse.sshfs", "poll"), ("/mnt/usb/fed", "fuseblk", "events"),
    ("/mnt/my share/r", "nfs", "poll"), ("/mnt/federation", "ext4", "events")])
def test_auto_mode_follows_the_mount(path: str, fstype: str, mode: str) -> None:
    assert filesystem_type(Path(path), MOUNTINFO) == fstype
    chosen, why = choose_mode("auto", Path(path), MOUNTINFO)
    assert chosen == mode and fstype in why
    assert choose_mode("events", Path(path), MOUNTINFO)[0] == "events"
    assert choose_mode("poll", Path(path), MOUNTINFO)[0] == "poll"


@pytest.mark.parametrize("mode", ["events", "poll"])
def test_watchers_wake_on_whole_files_not_temporaries(tmp_path: Path, mode: str) -> None:
    (tmp_path / "workers").mkdir()
    with ShareWatcher(Share(tmp_path), mode, poll_interval=0.2) as w:
        (tmp_path / "workers" / ".w1.yaml.abc.tmp").write_text("partial")
        assert not w.wait(0.8), "a temporary file must not wake anyone"
        atomic_write(tmp_path / "workers" / "w1.yaml", b"name: w1\n")
        assert w.wait(5)
        (tmp_path / "0001" / "updates").mkdir(parents=True)
        assert w.wait(5)
        atomic_write(tmp_path / "0001" / "updates" / "w1.yaml", b"x")
        assert w.wait(5)


@pytest.mark.processes
def test_a_run_carried_by_polling_alone(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--watch", "poll")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--watch", "poll")
    out = finish(coord, timeout=120)
    wout = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + wout
    assert "polling every 1 s" in out and "polling every 1 s" in wout
    assert parse(FinalMarker, Share(share).read_yaml(Share.final_marker), "f").round == 2
