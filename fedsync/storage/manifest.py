"""Where a run starts and ends in the share: fedsync.yaml (written once) and final.yaml."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from fedsync.base.errors import FormatError, ShareError, TrustError
from fedsync.storage.keys import Identity
from fedsync.storage.lease import read_lease
from fedsync.storage.markers import (
    FORMAT_VERSION,
    FinalMarker,
    FormatMismatch,
    Manifest,
    MarkerError,
    TaskRecord,
    to_dict,
)
from fedsync.storage.sealing import NotAKey, recipient_key
from fedsync.storage.share import Share
from fedsync.storage.signing import final_message, recipient_message, verify


def new_manifest(config: dict[str, Any], created_by: str, signing: Identity, task: TaskRecord,
                 recipient: str | None = None) -> Manifest:
    """A new run's fedsync.yaml; with `recipient` (confidential updates) the key workers seal to, signed."""
    now = datetime.now(timezone.utc)  # the run's name and `created` are the same instant
    run_id = f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    signature = signing.sign(recipient_message(run_id, recipient)) if recipient else None
    return Manifest(format=FORMAT_VERSION, run_id=run_id, created=now.isoformat(timespec="seconds"),
                    created_by=created_by, coordinator_key=signing.public, config=config, task=task,
                    recipient=recipient, recipient_signature=signature)


def write_manifest(share: Share, manifest: Manifest) -> Manifest:
    """Start the run: create the share if needed and write fedsync.yaml, once."""
    share.start(to_dict(manifest))
    return manifest


def read_manifest(share: Share) -> Manifest:
    """The run's fedsync.yaml; a share folder that is absent, or holds no run, is said as such."""
    if not share.exists(share.manifest):
        share.require()
        raise ShareError(f"{share.where()} holds no fedsync run (no fedsync.yaml): start one with `fedsync "
                         f"coordinator --share {share.where()}`, or fix --share")
    try:
        return share.read_record(Manifest, share.manifest)
    except FormatMismatch as e:
        raise FormatError(str(e)) from None
    except (MarkerError, ValueError, OSError) as e:
        raise ShareError(f"{share.where(share.manifest)} is unreadable: {e}") from None


def finished(share: Share, run_id: str, coordinator_key: str) -> FinalMarker | None:
    """final.yaml, if the run's coordinator signed it and it names this run and a round at least as new as the
    newest opened round (a run that ended at its privacy budget left the next round's folder with its global model
    and no assignment), and no coordinator's lease says it drives the run past that round (PROTOCOL 7.4: a run
    being extended, before its coordinator took the old final.yaml away)."""
    try:
        final = share.read_record(FinalMarker, share.final_marker)
    except Exception:  # noqa: BLE001 - absent or not synced whole yet: the run is not over
        return None
    if not verify(coordinator_key, final_message(final), final.signature):
        return None
    rounds = share.rounds()
    newest = rounds[-1] if rounds else 0
    if newest > final.round and not share.exists(share.assignment(newest)):
        newest -= 1  # not opened
    lease = read_lease(share)
    extended = (lease is not None and lease.run_id == run_id and lease.state not in ("stopped", "finished")
                and (lease.rounds or 0) > final.round)
    return final if final.run_id == run_id and final.round >= newest and not extended else None


def sealing_recipient(manifest: Manifest, coordinator_key: str) -> str | None:
    """The key this run's workers seal their updates to, as the coordinator signed it in fedsync.yaml; None when the
    run keeps plain updates. A recipient without the coordinator's signature is refused: whoever can write the share
    could otherwise swap in their own key and read every update sealed after."""
    if not manifest.config.get("confidential_updates", False):
        return None
    recipient = manifest.recipient
    if recipient is None or not verify(coordinator_key, recipient_message(manifest.run_id, recipient),
                                       manifest.recipient_signature):
        raise TrustError(f"fedsync.yaml of run {manifest.run_id} names a recipient for sealed updates that the "
                         "coordinator's key did not sign: someone else rewrote it, perhaps to read the updates; "
                         "this worker sends nothing")
    try:
        recipient_key(recipient)
    except NotAKey as e:
        raise TrustError(f"fedsync.yaml's recipient {recipient[:16]}… is not an age key: {e}") from None
    return recipient
