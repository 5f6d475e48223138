"""Locks between processes of this machine on one share: one per role, and one around trust.yaml's changes."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from filelock import FileLock


def local_lock(share_identity: str, role: str, timeout: float = 0) -> FileLock:
    """A lock that stops two processes on this machine acting as the same role on one share.

    It lives in the local temp folder, never in the share: file locks are not reliable across machines
    (NFS, SMB and sync tools each behave differently), and a lock file in the share would be synced.
    """
    key = hashlib.sha256(share_identity.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fedsync-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{key}-{role}.lock"), timeout=timeout)
