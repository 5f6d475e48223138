"""Waiting for the share to change: inotify events through watchdog, or polling, plus a periodic rescan.

Events only wake the loop; the loop then rescans the share and decides from what is there. So a missed,
merged or reordered event costs at most one rescan interval, never correctness.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .share import is_temporary

WATCH_MODES = ("auto", "events", "poll")
# watchdog logs an error when an event arrives while its emitter thread stops; during our own stop that is noise.
_EMITTER_LOG = logging.getLogger("watchdog.observers.inotify")


class _Wake(FileSystemEventHandler):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # our own reads would wake us
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if not is_temporary(Path(path).name):
            self.flag.set()


class ShareWatcher:
    """`with ShareWatcher(root) as w: ... w.wait(seconds)` returns early when something in the share changed."""

    def __init__(self, root: Path, mode: str = "auto", poll_interval: float = 1.0) -> None:
        if mode not in WATCH_MODES:
            raise ValueError(f"watch mode {mode!r} is not one of {', '.join(WATCH_MODES)}")
        self.root = root
        self.mode = "events" if mode == "auto" else mode
        self.changed = threading.Event()
        observer: BaseObserver = PollingObserver(timeout=poll_interval) if self.mode == "poll" else Observer()
        observer.schedule(_Wake(self.changed), str(root), recursive=True)
        self.observer = observer

    def __enter__(self) -> ShareWatcher:
        self.observer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        level = _EMITTER_LOG.level
        _EMITTER_LOG.setLevel(logging.CRITICAL)
        try:
            self.observer.stop()
            self.observer.join(timeout=5)
        finally:
            _EMITTER_LOG.setLevel(level)

    def wait(self, timeout: float) -> bool:
        """Block until a change or `timeout` seconds; True if something changed."""
        changed = self.changed.wait(max(0.0, timeout))
        self.changed.clear()
        return changed
