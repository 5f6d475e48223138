"""The coordinator's lease on a share: coordinator.yaml, refreshed by its owner, so a second coordinator
refuses instead of writing beside the first (two writers would break docs/DESIGN.md, invariant 1).

On one host the local file lock decides at once. Across hosts, a coordinator that finds another's lease
watches the file for `timeout` seconds by its own clock (docs/DESIGN.md, invariant 5): a change means the owner is
alive and it refuses; no change means the owner died and it takes over. On an object store every write of the
lease is conditional on the version last seen (docs/PROTOCOL.md section 5.2), which closes the moments between a
look and a write that a folder leaves open: two coordinators taking over at once, or one presumed dead writing on.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from fedsync.base.clock import utc_stamp
from fedsync.base.errors import ShareError
from fedsync.storage.markers import FORMAT_VERSION, CoordinatorLease, Rejected, to_dict
from fedsync.storage.share import Share
from fedsync.storage.store import Signature, WriteConflict
from fedsync.storage.trouble import RepeatedWrite
from fedsync.storage.watch import changes_within
from fedsync.storage.yamlfile import dump_yaml


def read_lease(share: Share) -> CoordinatorLease | None:
    """The lease in the share; None when absent or not synced whole (no live lease can be proven from it)."""
    try:
        return share.read_record(CoordinatorLease, share.lease)
    except Exception:  # noqa: BLE001 - absent, unreadable or malformed: all mean "no lease to respect"
        return None


class Lease:
    def __init__(self, share: Share, run_id: str, refresh: float, timeout: float,
                 log: Callable[[str], None], rounds: int | None = None) -> None:
        self.share, self.refresh, self.timeout, self.log = share, refresh, timeout, log
        self.lost = threading.Event()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.writes = RepeatedWrite(log, share.lease, f"every {refresh:g} s")
        self.record = CoordinatorLease(format=FORMAT_VERSION, run_id=run_id,
                                       owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                                       host=socket.gethostname(), pid=os.getpid(), heartbeat=0, state="starting",
                                       round=None, note="", rounds=rounds)
        self.thread = threading.Thread(target=self._beat, name="lease", daemon=True)
        self.held: Signature | None = None  # on an object store: the lease's version this coordinator last saw

    def check(self) -> None:
        """Refuse (ShareError) while another host's coordinator keeps its lease fresh; reads only."""
        self.held = self.share.signature(self.share.lease)
        other = read_lease(self.share)
        if other is None or other.state == "stopped" or other.host == self.record.host:
            return  # same host: the caller holds the local lock, so the previous owner on this host is gone
        # Another host's coordinator may be alive: watch its lease for one timeout, by our clock.
        self.log(f"share has a lease from coordinator {other.owner}; watching it for {self.timeout:.0f} s")
        if changes_within(self.share, self.share.lease, self.held, self.timeout, min(0.5, self.refresh)):
            now = read_lease(self.share)
            raise ShareError(f"{self.share.where()} is driven by coordinator {(now or other).owner} on host "
                             f"{(now or other).host}, which is refreshing its lease: stop it first")
        self.log(f"coordinator {other.owner} on {other.host} did not refresh its lease for "
                 f"{self.timeout:.0f} s: taking over")

    def acquire(self) -> None:
        """Take the lease (after check()) and keep it fresh from a thread."""
        self._write()
        self.thread.start()

    def update(self, state: str, round: int | None = None, note: str = "",
               rejected: Sequence[Rejected] = ()) -> None:
        with self.lock:
            if round != self.record.round:
                self.record = replace(self.record, accepted=[], quorum=None)  # a new round: no progress yet
            self.record = replace(self.record, state=state, round=round, note=note, rejected=list(rejected))
        self._refresh()

    def progress(self, accepted: list[str], quorum: int) -> None:
        """The open round's accepted updates and the quorum target, for `fedsync status` (written when they
        change)."""
        with self.lock:
            if (accepted, quorum) == (self.record.accepted, self.record.quorum):
                return
            self.record = replace(self.record, accepted=accepted, quorum=quorum)
        self._refresh()

    def release(self, state: str = "stopped", note: str | None = None) -> None:
        """The last write: `finished`, or `stopped` with why (workers and `fedsync status` say it)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        if not self.lost.is_set():
            self.update(state, self.record.round, self.record.note if note is None else note, self.record.rejected)

    def _write(self) -> None:
        if self.share.store.conditional_writes:
            return self._write_conditionally()
        with self.lock:
            current = read_lease(self.share)
            if current is not None and current.owner != self.record.owner and self.record.heartbeat > 0:
                self.lost.set()  # someone took over (we were presumed dead): stop writing to this share
                return
            self.record = replace(self.record, heartbeat=self.record.heartbeat + 1, written_at=utc_stamp())
            self.share.write_yaml(self.share.lease, to_dict(self.record))

    def _write_conditionally(self) -> None:
        with self.lock:
            first = self.record.heartbeat == 0
            self.record = replace(self.record, heartbeat=self.record.heartbeat + 1, written_at=utc_stamp())
            try:
                self.held = self.share.write_if(self.share.lease, dump_yaml(to_dict(self.record)), self.held)
                return
            except WriteConflict:
                current = read_lease(self.share)
            if current is not None and current.owner == self.record.owner:  # our own write, its answer lost
                self.held = self.share.signature(self.share.lease)
            elif first:
                raise ShareError(f"another coordinator ({current.owner if current else 'unknown'}) took the lease of "
                                 f"{self.share.where()} while this one looked at it: stop one of them")
            else:
                self.lost.set()  # someone took over (we were presumed dead): stop writing to this share

    def _refresh(self) -> None:
        self.writes.attempt(self._write)

    def _beat(self) -> None:
        while not self.stopped.wait(self.refresh):
            self._refresh()
            if self.lost.is_set():
                self.log("another coordinator took over this share; stopping")
                return
