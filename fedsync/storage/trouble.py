"""Share trouble (a full disk, a dropped mount, a read-only remount) reported in lines a person can act on,
and retried: idempotent steps with backoff, repeating writes with one line when trouble starts and one when it ends.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

OS_TROUBLE = {
    errno.ENOSPC: "the share's disk is full",
    errno.EDQUOT: "the share's quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the share is mounted read-only",
    errno.ESTALE: "stale network file handle (the server restarted or the share was remounted)",
    errno.ENOTCONN: "the share is disconnected (its FUSE or network mount is gone)",
    errno.ENOENT: "a file or folder vanished (is the share unmounted?)",
    errno.EIO: "input/output error on the share",
}


def explain(e: OSError) -> str:
    """One line a person can act on, naming the file."""
    where = f": {e.filename}" if e.filename else ""
    return OS_TROUBLE.get(e.errno or 0, e.strerror or str(e)) + where


class Backoff:
    """Retry delays for share trouble: 0.5 s doubling to 30 s, reset by a success."""

    def __init__(self, log: Callable[[str], None], first: float = 0.5, cap: float = 30.0) -> None:
        self.log, self.first, self.cap, self.delay = log, first, cap, first

    def failed(self, e: Exception, what: str) -> float:
        delay = self.delay
        problem = explain(e) if isinstance(e, OSError) else str(e)
        self.log(f"share trouble while {what}: {problem}; retrying in {delay:.1f} s")
        self.delay = min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    def run(self, action: Callable[[], T], what: str,
            retry: tuple[type[Exception], ...] = (OSError,)) -> T:
        """Run an idempotent step until it succeeds, sleeping between attempts at the errors in `retry`."""
        while True:
            try:
                result = action()
            except retry as e:
                time.sleep(self.failed(e, what))
                continue
            self.reset()
            return result


class RepeatedWrite:
    """Share trouble of a write that repeats on its own clock (a heartbeat, the lease): reported in one line
    when it starts and in one when it ends, never once per attempt."""

    def __init__(self, log: Callable[[str], None], what: str, every: str) -> None:
        self.log, self.what, self.every = log, what, every
        self.failing = False

    def attempt(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            if not self.failing:
                self.log(f"share trouble writing {self.what}: {explain(e)}; retrying {self.every}")
            self.failing = True
            return
        if self.failing:
            self.log(f"{self.what} written again")
        self.failing = False
