"""One line per event, prefixed with the time and the process's role, flushed at once (demo children share a
terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

Log = Callable[[str], None]


def make_log(role: str) -> Log:
    def log(message: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        print(f"{stamp} [{role}] {message}", file=sys.stdout, flush=True)

    return log
