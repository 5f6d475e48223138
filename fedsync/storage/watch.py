"""Waiting for the share to change, in the way that works on its medium, plus a periodic rescan.

Local disks report changes through inotify (watchdog's Observer). Network and FUSE filesystems (NFS, SMB/CIFS,
sshfs, rclone) report no writes made by *other* machines that way, so there fedsync polls. Events only wake the
loop; the loop then rescans the share and decides from what is there, so a missed, merged or reordered event
costs at most one rescan interval, never correctness.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from fedsync.base.errors import ConfigError
from fedsync.storage import names
from fedsync.storage.medium import OBJECT_POLL_INTERVAL_S, POLL_INTERVAL_S, choose_mode
from fedsync.storage.share import Share
from fedsync.storage.store import Signature

POLLED_ROUNDS = 3  # the newest round folders a poller looks into (late updates are at most this old)
# watchdog logs an error when an event arrives while its emitter thread stops; during our own stop that is noise.
_EMITTER_LOG = logging.getLogger("watchdog.observers.inotify")
# watchdog 7 warns when a folder it already watches is added again (Syncthing creates folders that way); the
# watch stays correct, so the warning is noise on every synced round.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


def changes_within(share: Share, name: str, seen: Signature | None, seconds: float, poll: float) -> bool:
    """Whether a file rewritten by a process on another host (a lease, a job's plan) changes from `seen` within
    `seconds` by this process's clock: its writer is alive (docs/DESIGN.md, invariant 5)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(poll)
        if share.signature(name) != seen:
            return True
    return False


class _Wake(FileSystemEventHandler):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # our own reads would wake us
        if event.is_directory and event.event_type == "modified":
            return  # a folder's mtime moves with every temporary file; the files' own events matter
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if not names.is_temporary(Path(path).name):
            self.flag.set()


class _Poller(threading.Thread):
    """Every `interval` seconds, list the folders where the protocol is active; wake on any difference."""

    def __init__(self, share: Share, flag: threading.Event, interval: float) -> None:
        super().__init__(name="share-poller", daemon=True)
        self.share, self.flag, self.interval = share, flag, interval
        self.stopping = threading.Event()
        self.previous: frozenset[tuple[object, ...]] | None = None

    def snapshot(self) -> frozenset[tuple[object, ...]]:
        """What the active folders hold: the share's top (which names the rounds), workers/, the newest rounds with
        their updates/, and each inference job's folder and outputs/ (one listing request each on an object store)."""
        seen: list[tuple[object, ...]] = []
        top = self._listed("", seen)
        newest = sorted(int(n) for n in top if names.ROUND_DIR.match(n))[-POLLED_ROUNDS:]
        for folder in [names.WORKERS] + [f for r in newest for f in (names.round_dir(r), names.updates_dir(r))]:
            self._listed(folder, seen)
        if names.JOBS in top:  # inference jobs: each one's plan and outputs
            for job in self._listed(names.JOBS, seen):
                self._listed(names.job_dir(job), seen)
                self._listed(names.outputs_dir(job), seen)
        return frozenset(seen)

    def _listed(self, folder: str, seen: list[tuple[object, ...]]) -> list[str]:
        try:
            entries = self.share.list(folder)
        except OSError:
            return []  # absent for now, or the share hiccupped: the next poll looks again
        for e in entries:
            if names.is_temporary(e.name):
                continue
            # a folder's own signature moves with every temporary file in it: its name is what counts
            seen.append((folder, e.name) if e.folder else (folder, e.name, e.signature))
        return [e.name for e in entries if e.folder]

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            now = self.snapshot()
            if self.previous is not None and now != self.previous:
                self.flag.set()
            self.previous = now


class ShareWatcher:
    """`with ShareWatcher(share) as w: ... w.wait(seconds)` returns early when something in the share changed."""

    def __init__(self, share: Share, mode: str = "auto", poll_interval: float | None = None,
                 list_store: bool = True) -> None:
        """`list_store=False`: on an object store, do not poll at all (a coordinator's or worker's own rescans
        already look at everything it waits for, and each poll is eight billed listings); `wait` then only waits."""
        self.share = share
        folder = share.store.local_folder
        if folder is not None:
            self.mode, self.why = choose_mode(mode, folder)
        elif mode == "events":
            raise ConfigError(f"--watch events needs a folder: {share.where()} is an object store, which only listing "
                             "sees (--watch poll or auto)")
        elif not list_store:
            self.mode, self.why = "rescan", f"{share.where()} is an object store"
        else:
            self.mode, self.why = "poll", f"{share.where()} is an object store: listing by prefix is the only way"
        self.changed = threading.Event()
        self.poller: _Poller | None = None
        self.observer = None
        if self.mode == "rescan":
            self.describe = f"its own rescans only ({self.why}: no listing between them)"
        elif self.mode == "poll":
            poll_interval = poll_interval or (POLL_INTERVAL_S if folder is not None else OBJECT_POLL_INTERVAL_S)
            self.poller = _Poller(share, self.changed, poll_interval)
            self.describe = f"polling every {poll_interval:g} s ({self.why})"
        else:
            self.observer = Observer()
            self.observer.schedule(_Wake(self.changed), str(folder), recursive=True)
            self.describe = f"inotify events ({self.why})"

    def __enter__(self) -> ShareWatcher:
        if self.poller is not None:
            self.poller.previous = self.poller.snapshot()
            self.poller.start()
        elif self.observer is not None:
            self.observer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.poller is not None:
            self.poller.stopping.set()
            self.poller.join(timeout=5)
            return
        if self.observer is None:
            return
        level = _EMITTER_LOG.level
        _EMITTER_LOG.setLevel(logging.CRITICAL)
        try:
            self.observer.stop()  # type: ignore[union-attr]
            self.observer.join(timeout=5)  # type: ignore[union-attr]
        finally:
            _EMITTER_LOG.setLevel(level)

    def wait(self, timeout: float) -> bool:
        """Block until a change or `timeout` seconds; True if something changed."""
        changed = self.changed.wait(max(0.0, timeout))
        self.changed.clear()
        return changed
