"""One line per event, prefixed with the time and the process's role, flushed at once (demo children share a
terminal); or, for log collectors, one JSON object per event. On a terminal a process may also keep one progress
line under its log, rewritten in place and cleared before each event line; redirected output never gets one, nor
does a process started with FEDSYNC_NO_PROGRESS set (the demo's, which share one terminal)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TextIO

Log = Callable[[str], None]
CLEAR_LINE = "\r\x1b[K"
NO_PROGRESS = "FEDSYNC_NO_PROGRESS"


class Logger:
    """A process's log: `logger(message)` writes an event; `logger.progress(text)` shows work under way."""

    def __init__(self, role: str, json_lines: bool = False, stream: TextIO | None = None) -> None:
        self.role, self.json_lines, self.stream = role, json_lines, stream or sys.stdout
        self.live = not json_lines and self.stream.isatty() and not os.environ.get(NO_PROGRESS)
        self.shown = ""  # the progress line on screen now

    def __call__(self, message: str) -> None:
        now = time.time()
        if self.json_lines:
            level = "warning" if message.startswith("WARNING") else "info"
            stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
            line = json.dumps({"time": stamp, "role": self.role, "level": level, "message": message})
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            line = f"{stamp} [{self.role}] {message}"
        self.stream.write((CLEAR_LINE if self.shown else "") + line + "\n" + self.shown)
        self.stream.flush()

    def progress(self, text: str) -> None:
        """Rewrite the progress line (on a terminal only); an empty text clears it."""
        if not self.live or text == self.shown:
            return
        self.shown = text
        self.stream.write(CLEAR_LINE + text)
        self.stream.flush()


def make_log(role: str, json_lines: bool = False) -> Logger:
    return Logger(role, json_lines)
