"""What this machine lends a process: the cores it may run on and the memory it has free. Lanes, loader processes
and in-memory budgets are sized from these, so one place decides how a container's or a taskset's limits count.

A container's limits live in its cgroup, which /proc/cpuinfo and /proc/meminfo do not show: cgroup v2 files at
/sys/fs/cgroup (cpu.max, memory.max, memory.current), or v1's under /sys/fs/cgroup/cpu and /sys/fs/cgroup/memory."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 62  # v1 writes "no limit" as a number near 2^63


def cores() -> int:
    """CPUs this process may use: its affinity set (taskset, cpusets), further bounded by a cgroup CPU quota (a
    container's --cpus), which the affinity set does not show."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity sets
        n = os.cpu_count() or 1
    return max(1, min(n, quota_cores(_cpu_max()) or n))


def quota_cores(cpu_max: str | None) -> int | None:
    """Whole cores a cgroup v2 `cpu.max` line ("<quota> <period>", or "max <period>") allows (a fraction rounds
    up: 1.5 CPUs keep two threads busy three quarters of the time); None without a quota or a readable line."""
    parts = (cpu_max or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def _cpu_max() -> str | None:
    """The CPU quota as a v2 `cpu.max` line, from v1's two files where that is what the machine has."""
    if (line := _read(CGROUP / "cpu.max")) is not None:
        return line
    quota, period = _read(CGROUP / "cpu" / "cpu.cfs_quota_us"), _read(CGROUP / "cpu" / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return f"{'max' if quota.strip() == '-1' else quota.strip()} {period.strip()}"


def free_memory() -> int:
    """Bytes of memory this process may still take: the machine's free memory (Linux: MemAvailable; elsewhere its
    physical memory), or less where its cgroup's limit leaves less room."""
    available = _available()
    room = memory_room(*_cgroup_memory())
    return min(available, room) if room is not None else available


def memory_room(limit: str | None, usage: str | None) -> int | None:
    """What a cgroup's memory limit leaves above its usage (v2 `memory.max` and `memory.current`, or v1's
    `memory.limit_in_bytes` and `memory.usage_in_bytes`); None without a limit or a readable pair."""
    if limit is None or usage is None or limit.strip() == "max":
        return None
    try:
        cap, used = int(limit), int(usage)
    except ValueError:
        return None
    return max(0, cap - used) if cap < UNLIMITED else None


def _cgroup_memory() -> tuple[str | None, str | None]:
    if (limit := _read(CGROUP / "memory.max")) is not None:
        return limit, _read(CGROUP / "memory.current")
    return _read(CGROUP / "memory" / "memory.limit_in_bytes"), _read(CGROUP / "memory" / "memory.usage_in_bytes")


def _available() -> int:
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
