"""What the machine lends a process, read the way containers and tasksets limit it."""

import os

from fedsync.base.machine import cores, free_memory, quota_cores


def test_a_cgroup_quota_counts_whole_cores_and_no_quota_counts_none() -> None:
    assert quota_cores("max 100000") is None
    assert quota_cores("200000 100000") == 2
    assert quota_cores("150000 100000") == 2  # 1.5 CPUs keep two threads busy three quarters of the time
    assert quota_cores("50000 100000") == 1
    assert quota_cores("") is None and quota_cores(None) is None
    assert quota_cores("lots 100000") is None and quota_cores("100000") is None and quota_cores("0 100000") is None


def test_cores_are_this_process_s_affinity_set_at_most() -> None:
    assert 1 <= cores() <= len(os.sched_getaffinity(0))
    assert free_memory() > 0
