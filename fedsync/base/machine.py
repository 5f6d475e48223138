"""What this machine lends a process: the cores it may run on and the memory it has free. Lanes, loader processes
and in-memory budgets are sized from these, so one place decides how a container's or a taskset's limits count."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cores() -> int:
    """CPUs this process may use: its affinity set (taskset, cpusets), further bounded by a cgroup v2 CPU quota (a
    container's --cpus), which the affinity set does not show."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity sets
        n = os.cpu_count() or 1
    return max(1, min(n, quota_cores(_read(CGROUP_CPU_MAX)) or n))


def quota_cores(cpu_max: str | None) -> int | None:
    """Whole cores a cgroup v2 `cpu.max` line allows (a fraction rounds up: 1.5 CPUs keep two threads busy half the
    time); None without a quota or a readable line."""
    parts = (cpu_max or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def free_memory() -> int:
    """Bytes of memory this machine has free (Linux: MemAvailable; elsewhere its physical memory)."""
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
