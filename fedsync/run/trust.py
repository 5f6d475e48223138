"""Which workers' updates count: each worker name's key, pinned the first time the coordinator sees it (trust: tofu)
or approved by a person with `fedsync trust NAME` (trust: explicit), listed in trust.yaml, which only the
coordinator's key signs (docs/PROTOCOL.md section 5.9)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from fedsync.base.errors import ShareError, TrustError, UsageError
from fedsync.base.logs import Log
from fedsync.storage import names
from fedsync.storage.keys import Identity, coordinator_key_path, load_identity
from fedsync.storage.locks import local_lock
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    Manifest,
    MarkerError,
    TrustedKey,
    TrustList,
    UpdateMarker,
    WorkerInfo,
    to_dict,
)
from fedsync.storage.names import check_worker_name
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import fingerprint, trust_message, update_message, verify

Entries = dict[str, TrustedKey]
REVOKED = "revoked"  # trust.yaml's state of a key a person withdrew (`fedsync trust NAME --revoke`)
EXCLUDED = "excluded"  # the coordinator withdrew it: the worker's updates were rejected round after round
WITHDRAWN = (REVOKED, EXCLUDED)  # no work, and updates rejected as untrusted_key, until a key is approved again


def read_trust(share: Share, run_id: str, coordinator_key: str) -> Entries:
    """trust.yaml's entries ({} while it does not exist); TrustError when the coordinator did not sign it."""
    if not share.exists(share.trust):
        return {}
    where = share.where(share.trust)
    try:
        t = share.read_record(TrustList, share.trust)
    except (MarkerError, ValueError) as e:
        raise TrustError(f"{where} is unreadable: {e}") from None
    message = trust_message(t.run_id, {n: (e.key, e.state) for n, e in t.workers.items()})
    if t.run_id != run_id or not verify(coordinator_key, message, t.signature):
        raise TrustError(f"{where} is not signed by this run's coordinator key ({fingerprint(coordinator_key)}): "
                         "someone else wrote it. Restore it from a backup, or move it aside to pin every worker's "
                         "key again (trust: tofu) or approve them again (trust: explicit)")
    return t.workers


def amend_trust(share: Share, run_id: str, identity: Identity, change: Callable[[Entries], None]) -> Entries:
    """Read trust.yaml, apply `change`, sign and write it; under a lock of this machine, so the coordinator pinning a
    key and `fedsync trust` approving one never lose each other's change (both need the coordinator's key, so both
    run on its machine)."""
    with local_lock(share.identity, "trust", timeout=30):
        entries = dict(read_trust(share, run_id, identity.public))
        change(entries)
        entries = dict(sorted(entries.items()))
        message = trust_message(run_id, {n: (e.key, e.state) for n, e in entries.items()})
        share.write_yaml(share.trust, to_dict(TrustList(format=FORMAT_VERSION, run_id=run_id, workers=entries,
                                                        signature=identity.sign(message))))
    return entries


def approve(share: Share, run_id: str, identity: Identity, name: str, key: str) -> Entries:
    """`fedsync trust NAME`: the worker's current key counts from now on, replacing any key pinned before."""
    return amend_trust(share, run_id, identity, lambda e: e.__setitem__(name, TrustedKey(key, "approved")))


def check_coordinator_key(share: Share, manifest: Manifest, identity: Identity) -> None:
    """Only the key that started a run continues it (workers check every assignment against that key) or amends its
    trust.yaml; a forged trust.yaml refuses too."""
    if manifest.coordinator_key != identity.public:
        raise TrustError(f"run {manifest.run_id} in {share.where()} was started with coordinator key "
                         f"{fingerprint(manifest.coordinator_key)}; this one ({identity.path}) is "
                         f"{identity.fingerprint}: copy the key file that started the run here, or pass it with --key")
    read_trust(share, manifest.run_id, identity.public)


def approve_registered(share: Share, name: str, key_path: Path | None, expected: str | None) -> str:
    """`fedsync trust NAME`: approve the key in workers/NAME.yaml, signed with the coordinator's key; its
    fingerprint. Refuses when this machine's key did not start the run or the fingerprint differs."""
    manifest, identity = _coordinator(share, key_path)
    key = _registered_key(share, name)
    found = fingerprint(key)
    if expected is not None and expected != found:
        raise TrustError(f"worker {name}'s registered key has fingerprint {found}, not {expected}: someone else may "
                         "have registered under that name; nothing approved")
    approve(share, manifest.run_id, identity, name, key)
    return found


def revoke_worker(share: Share, name: str, key_path: Path | None) -> str:
    """`fedsync trust NAME --revoke`: the worker's key no longer counts (on purpose: a worker gone bad); it gets no
    work and its updates are rejected until a person approves a key for it again. The fingerprint revoked."""
    manifest, identity = _coordinator(share, key_path)
    entry = read_trust(share, manifest.run_id, identity.public).get(name)
    key = entry.key if entry is not None else _registered_key(share, name)
    amend_trust(share, manifest.run_id, identity, lambda e: e.__setitem__(name, TrustedKey(key, REVOKED)))
    return fingerprint(key)


def _coordinator(share: Share, key_path: Path | None) -> tuple[Manifest, Identity]:
    """The run, and this machine's coordinator key, which must be the one that started it (trust.yaml is signed)."""
    manifest = read_manifest(share)
    identity, _ = load_identity(key_path or coordinator_key_path(), create=False)
    check_coordinator_key(share, manifest, identity)
    return manifest, identity


def _registered_key(share: Share, name: str) -> str:
    """The public key in workers/NAME.yaml; a name that never registered is bad usage, said with those that did."""
    try:
        registration = share.worker_file(check_worker_name(name))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not share.exists(registration):
        known = sorted(w for e in share.list(share.workers_dir) if (w := names.marker_owner(e.name)) is not None)
        raise UsageError(f"no worker named {name!r} has registered in {share.where()} (registered: "
                         f"{', '.join(known) or 'none yet'}); `fedsync status` lists them")
    try:
        info = share.read_record(WorkerInfo, registration)
    except (OSError, ValueError) as e:
        raise ShareError(f"{share.where(registration)} is unreadable ({e}): wait for it to sync whole, or restart "
                         f"worker {name} so that it registers again") from None
    if info.public_key is None:
        raise TrustError(f"worker {name} registered without a public key: upgrade fedsync on that machine")
    return info.public_key


def approve_command(name: str, where: str, key: str) -> str:
    """The command, ready to paste, that approves `key` for worker `name` in the share at `where`."""
    return f"`fedsync trust {name} --share {where} --fingerprint {fingerprint(key)}`"


def trust_state(name: str, registered: str | None, entry: TrustedKey | None, mode: str, where: str) -> str | None:
    """None when `name`'s registered key counts, else why not, in words a person can act on (`where`: the share, as
    the approving command must name it)."""
    if registered is None:
        return "registered without a public key (an older or hand-made worker): its updates cannot be checked"
    approve = approve_command(name, where, registered)
    if entry is not None and entry.state == REVOKED:
        return (f"its key {fingerprint(entry.key)} was revoked (`fedsync trust {name} --revoke`): no work, and its "
                f"updates do not count; {approve} trusts its registered key again")
    if entry is not None and entry.state == EXCLUDED:
        return (f"excluded by the coordinator: its updates were rejected for what they held in exclude_after rounds "
                f"in a row (the summaries say why); no work until {approve} trusts it again")
    if entry is None:
        return None if mode == "tofu" else f"waits for approval of its key {fingerprint(registered)}: run {approve}"
    if entry.key != registered:
        return (f"registers key {fingerprint(registered)}, not the trusted {fingerprint(entry.key)}: no work until "
                f"it is approved; if this worker really has a new key, run {approve}")
    return None


class Trust:
    """The coordinator's side: whom to assign work to, and whether an update marker is its worker's own."""

    def __init__(self, share: Share, run_id: str, identity: Identity, mode: str,
                 registered: Callable[[str], str | None], log: Log) -> None:
        self.share, self.run_id, self.identity, self.mode, self.log = share, run_id, identity, mode, log
        self.registered = registered
        self.entries = read_trust(share, run_id, identity.public)  # forged: TrustError, the start is refused
        self.seen = share.signature(share.trust)
        self.told: set[str] = set()

    def refresh(self) -> bool:
        """Re-read trust.yaml when it changed (`fedsync trust` approved a key); whether the trusted keys changed. A
        forged one is reported and not used."""
        now = self.share.signature(self.share.trust)
        if now == self.seen:
            return False
        self.seen = now
        try:
            entries = read_trust(self.share, self.run_id, self.identity.public)
        except TrustError as e:
            self._tell(f"WARNING: {e}; keeping the keys trusted so far")
            return False
        changed, self.entries = entries != self.entries, entries
        return changed

    def admit(self, name: str) -> bool:
        """Whether `name` may be given work; under tofu a name seen for the first time has its key pinned now."""
        return bool(self.admit_all([name]))

    def admit_all(self, names: Iterable[str]) -> list[str]:
        """The workers among `names` that may be given work. Under tofu every name seen for the first time has its key
        pinned, all in one amendment of trust.yaml: one per worker would read and rewrite a file that grows with the
        workers once per worker (quadratic: 104 of 172 CPU s at 300 workers, docs/BENCHMARKS.md)."""
        admitted: list[str] = []
        new: dict[str, str] = {}
        for name in names:
            key = self.registered(name)
            problem = trust_state(name, key, self.entries.get(name), self.mode, self.share.where())
            if problem is not None:
                self._tell(f"worker {name}: {problem}")
                continue
            if name not in self.entries and key is not None:
                new[name] = key
            admitted.append(name)
        if new:
            def pin(entries: Entries) -> None:
                for name, key in new.items():
                    entries.setdefault(name, TrustedKey(key, "pinned"))

            self.entries = amend_trust(self.share, self.run_id, self.identity, pin)
            self.seen = self.share.signature(self.share.trust)
            for name, key in new.items():
                self.log(f"worker {name}: pinned its key {fingerprint(key)} (trust: tofu)")
        return admitted

    def exclude(self, name: str) -> None:
        """Stop trusting `name`'s key (state excluded) until a person approves a key for it again."""
        entry = self.entries.get(name)
        if entry is None or entry.state in WITHDRAWN:
            return
        self.entries = amend_trust(self.share, self.run_id, self.identity,
                                   lambda e: e.__setitem__(name, TrustedKey(entry.key, EXCLUDED)))
        self.seen = self.share.signature(self.share.trust)

    def key_of(self, worker: str) -> str | None:
        """The key `worker`'s files must be signed with now; None when it has none, or it was revoked or excluded."""
        entry = self.entries.get(worker)
        return None if entry is None or entry.state in WITHDRAWN else entry.key

    def check_update(self, a: Assignment, worker: str, m: UpdateMarker, short: str) -> None:
        """Unusable unless the marker is signed by `worker`'s trusted key for this run, round and base model. Each of
        these waits (a forger must not shut the real worker out): the real worker's marker may still replace it."""
        if m.worker != worker:
            raise Unusable(Reason.WRONG_WORKER, f"{short} says it is from {m.worker!r}")
        if m.round != a.round:
            raise Unusable(Reason.WRONG_ROUND, f"{short} is for round {m.round}, found in round {a.round}")
        if m.base != a.model.blake3:
            raise Unusable(Reason.WRONG_BASE, f"{short} was trained from model {m.base[:12]}…")
        entry = self.entries.get(worker)
        if entry is None:
            raise Unusable(Reason.UNTRUSTED_KEY, f"{worker} has no trusted key in this run")
        if entry.state in WITHDRAWN:
            raise Unusable(Reason.UNTRUSTED_KEY, f"{worker}'s key {fingerprint(entry.key)} was {entry.state}")
        if m.signature is None:
            raise Unusable(Reason.UNSIGNED, f"{short} carries no signature")
        if verify(entry.key, update_message(self.run_id, m), m.signature):
            return
        registered = self.registered(worker)
        if registered is not None and registered != entry.key:
            raise Unusable(Reason.UNTRUSTED_KEY, f"{worker} now registers key {fingerprint(registered)}, not the "
                                                 f"trusted {fingerprint(entry.key)}")
        raise Unusable(Reason.BAD_SIGNATURE, f"{short}'s signature does not verify with {worker}'s key "
                                             f"{fingerprint(entry.key)}: forged, replayed, or changed after signing")

    def _tell(self, line: str) -> None:
        if line not in self.told:
            self.told.add(line)
            self.log(line)
