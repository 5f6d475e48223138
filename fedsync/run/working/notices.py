"""What a waiting worker says, so that nobody watches a silent process: that its key waits for approval (trust:
explicit) or was replaced by another under its name, and that the coordinator stopped before the run ended (and
why, from its lease) or drives the run again. Each is said once, when the file that tells it changes."""

from __future__ import annotations

from fedsync.base.errors import TrustError
from fedsync.base.logs import Log
from fedsync.run.trust import EXCLUDED, REVOKED, approve_command, read_trust
from fedsync.storage.keys import Identity
from fedsync.storage.lease import read_lease
from fedsync.storage.share import Share
from fedsync.storage.signing import fingerprint

UNSEEN = object()  # no look yet: unlike any signature, an absent file's (None) included


class Notices:
    def __init__(self, share: Share, name: str, run_id: str, coordinator_key: str, identity: Identity,
                 trust_mode: str, log: Log) -> None:
        self.share, self.name, self.run_id, self.coordinator_key = share, name, run_id, coordinator_key
        self.identity, self.trust_mode, self.log = identity, trust_mode, log
        self.trust_seen: object = UNSEEN  # trust.yaml's signature when last looked at
        self.lease_seen: object = UNSEEN  # coordinator.yaml's
        self.awaiting = False  # waiting for approval under trust: explicit
        self.stopped = False  # the coordinator's lease says it stopped

    def check(self) -> None:
        self._trust()
        self._coordinator()

    def _trust(self) -> None:
        seen = self.share.signature(self.share.trust)
        if seen == self.trust_seen:
            return
        self.trust_seen = seen
        try:
            entry = read_trust(self.share, self.run_id, self.coordinator_key).get(self.name)
        except TrustError as e:
            self.log(f"WARNING: {e}")
            return
        approve = f"{approve_command(self.name, self.share.where(), self.identity.public)} on the coordinator's machine"
        if entry is not None and entry.state == REVOKED and entry.key == self.identity.public:
            self.log(f"WARNING: the coordinator's operator revoked this worker's key {self.identity.fingerprint}: no "
                     f"work comes until it runs {approve}")
        elif entry is not None and entry.state == EXCLUDED and entry.key == self.identity.public:
            self.log(f"WARNING: the coordinator excluded this worker: its updates were rejected round after round "
                     f"(the rounds' summary.yaml say why); no work comes until its operator runs {approve}")
        elif entry is not None and entry.key != self.identity.public:
            self.log(f"WARNING: the coordinator trusts key {fingerprint(entry.key)} for {self.name}, not this "
                     f"worker's {self.identity.fingerprint}: no work comes until its operator runs {approve}")
        elif entry is None and self.trust_mode == "explicit" and not self.awaiting:
            self.awaiting = True
            self.log(f"waiting for approval: this run gives work only to approved workers (trust: explicit); "
                     f"training starts once the coordinator's operator runs {approve}")
        elif entry is not None and self.awaiting:
            self.awaiting = False
            self.log(f"approved: the coordinator trusts this worker's key {self.identity.fingerprint}; it trains "
                     "from the next round it is given")

    def _coordinator(self) -> None:
        seen = self.share.signature(self.share.lease)
        if seen == self.lease_seen:
            return
        self.lease_seen = seen
        lease = read_lease(self.share)
        if lease is not None and lease.state == "stopped":
            if not self.stopped:
                self.log(f"the coordinator stopped ({lease.note or 'it gave no reason'}); waiting for it to start "
                         "again: the run goes on from the share when it does")
            self.stopped = True
        elif lease is not None and self.stopped:
            self.stopped = False
            self.log(f"a coordinator drives the run again ({lease.host}, pid {lease.pid})")
