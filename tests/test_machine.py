"""What the machine lends a process, read the way containers and tasksets limit it."""

import os

from fedsync.base import machine
from fedsync.base.machine import cores, free_memory, memory_room, quota_cores


def test_a_cgroup_quota_counts_whole_cores_and_no_quota_counts_none() -> None:
    assert quota_cores("max 100000") is None
    assert quota_cores("200000 100000") == 2
    assert quota_cores("150000 100000") == 2  # 1.5 CPUs keep two threads busy three quarters of the time
    assert quota_cores("50000 100000") == 1
    assert quota_cores("") is None and quota_cores(None) is None
    assert quota_cores("lots 100000") is None and quota_cores("100000") is None and quota_cores("0 100000") is None


def test_a_cgroup_memory_limit_leaves_its_room_and_no_limit_leaves_the_machine_s() -> None:
    assert memory_room("4294967296\n", "1073741824\n") == 3 << 30
    assert memory_room("1000", "1200") == 0  # over its limit already (reclaim pending): nothing to spare
    assert memory_room("max\n", "1073741824") is None  # v2 without a limit
    assert memory_room("9223372036854771712", "6156873728") is None  # v1 without a limit
    assert memory_room(None, "5") is None and memory_room("5", None) is None and memory_room("x", "1") is None


def test_cores_and_memory_follow_the_cgroup_v1_and_v2_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(machine, "CGROUP", tmp_path)
    assert cores() == len(os.sched_getaffinity(0)) and free_memory() > 0  # no cgroup files: the machine's own
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(3 << 20))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(str(1 << 20))
    assert cores() == 1 and free_memory() == 2 << 20  # v1: a container given one CPU and 3 MiB
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert cores() == len(os.sched_getaffinity(0)) and free_memory() > 2 << 20  # v2's files, no limits, win
