"""Which workers are alive, judged by the coordinator's own clock (docs/DESIGN.md, invariant 5), and the heartbeat
a worker keeps for it.

A worker is seen alive when its workers/<name>.yaml changes: a heartbeat rewrites it (a new file by rename,
so the inode changes even where mtimes are coarse). The time of a change is when *this* process noticed it;
timestamps written by other machines are never compared with ours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from fedsync.base.clock import utc_stamp
from fedsync.base.logs import Log
from fedsync.storage import names
from fedsync.storage.markers import MarkerError, WorkerInfo, to_dict
from fedsync.storage.share import Share
from fedsync.storage.store import Signature
from fedsync.storage.trouble import RepeatedWrite


class Liveness:
    def __init__(self, share: Share, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.timeout = timeout
        self.clock = clock
        self.seen: dict[str, tuple[Signature, float]] = {}
        self.info: dict[str, WorkerInfo] = {}
        self.problems: dict[str, str] = {}  # registrations that do not count, by name: why
        self.said: dict[str, str] = {}  # the problems unsaid() returned already

    def unsaid(self) -> list[tuple[str, str]]:
        """Registrations that do not count and were not said yet (or now fail for another reason): a person waiting
        for workers must learn why one is not among them."""
        new = [(n, p) for n, p in sorted(self.problems.items()) if self.said.get(n) != p]
        self.said.update(new)
        return new

    def scan(self) -> list[str]:
        """Look at every registration file; return the names seen for the first time."""
        now = self.clock()
        new = []
        for entry in self.share.list(self.share.workers_dir):
            name = names.marker_owner(entry.name)
            if name is None:
                continue
            signature = entry.signature
            previous = self.seen.get(name)
            if previous is not None and previous[0] == signature:
                continue
            if self._read(name):
                if previous is None:
                    new.append(name)
                self.seen[name] = (signature, now)
        return new

    def _read(self, name: str) -> bool:
        try:
            names.check_worker_name(name)
            info = self.share.read_record(WorkerInfo, self.share.worker_file(name))
            if info.name != name:
                raise MarkerError(f"{self.share.worker_file(name)} names itself {info.name!r}")
        except Exception as e:  # noqa: BLE001 - OSError, YAMLError, MarkerError: retried on the file's next change
            self.problems[name] = str(e)
            return False
        self.problems.pop(name, None)
        self.info[name] = info
        return True

    def public_key(self, name: str) -> str | None:
        """The key `name` registered with, or None (not seen, or registered without one)."""
        info = self.info.get(name)
        return info.public_key if info else None

    def live(self) -> list[str]:
        now = self.clock()
        return sorted(n for n, (_, t) in self.seen.items()
                      if now - t <= self.timeout and self.info[n].state != "stopped")


class Heartbeat:
    """Rewrites workers/<name>.yaml every `interval` seconds from its own thread, so training never starves it."""

    def __init__(self, share: Share, info: WorkerInfo, interval: float, log: Log) -> None:
        self.share, self.info, self.interval, self.log = share, info, interval, log
        self.writes = RepeatedWrite(log, "the heartbeat", "every beat")
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.update(state="idle")
        self.thread.start()

    def update(self, **changes: object) -> None:
        """Record a change and write it; share trouble is reported once and retried by the next beat."""
        with self.lock:
            self.info = replace(self.info, heartbeat=self.info.heartbeat + 1, written_at=utc_stamp(),
                                **changes)  # type: ignore[arg-type]
            self.writes.attempt(lambda: self.share.write_yaml(self.share.worker_file(self.info.name),
                                                              to_dict(self.info)))

    def note(self, **changes: object) -> None:
        """Record a change; written now only when the state changes, else by the next beat (a serving worker runs
        many chunks a second, and every write wakes every process that watches the share)."""
        if changes.get("state", self.info.state) != self.info.state:
            self.update(**changes)
            return
        with self.lock:
            self.info = replace(self.info, **changes)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.update(state="stopped")

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            self.update()
