"""Named crash points for the fault-injection tests: `FEDSYNC_FAULT=<point>` makes the process SIGKILL itself
there, exactly as a power cut or `kill -9` would, so the tests can prove each point is survivable.

Points: `coordinator:collecting:<r>` (round r has taken in its first update), `coordinator:before-summary:<r>`
(round r's aggregate is written, its summary is not), `coordinator:after-summary:<r>`
(round r's summary is written, the metrics and next round are not), `coordinator:evaluating:<r>` (round r's
evaluation starts, in its thread, while a later round may be collecting), and `write:<share-relative path>`
(half of that file's bytes are in its temporary file; it is never renamed into place).
Unset in normal use: then each check is one dictionary lookup. (FEDSYNC_SLOWDOWN, a slow machine on demand,
is fedsync/learning/pace.py.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "FEDSYNC_FAULT"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(point: str) -> None:
    if os.environ.get(ENV) == point:
        die()


def crashes_writing(path: Path) -> bool:
    """True when the write of this file should die half-way (its path ends with the point's path)."""
    target = os.environ.get(ENV, "")
    return target.startswith("write:") and path.as_posix().endswith(target[len("write:"):])
