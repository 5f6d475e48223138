"""This machine's keys, kept outside the share: its own private key (created on first start, mode 0600), beside a
coordinator's the key that opens the updates sealed to it, and the coordinator keys its workers pinned at first
contact, one file per run."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsync.base.errors import TrustError
from fedsync.storage.local import atomic_write
from fedsync.storage.markers import MarkerError
from fedsync.storage.sealing import NotAKey, SealingIdentity
from fedsync.storage.signing import canonical_public, fingerprint, public_text, sign


def key_dir() -> Path:
    """$FEDSYNC_KEY_DIR, else $XDG_CONFIG_HOME/fedsync/keys, else ~/.config/fedsync/keys."""
    if os.environ.get("FEDSYNC_KEY_DIR"):
        return Path(os.environ["FEDSYNC_KEY_DIR"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "fedsync" / "keys"


def worker_key_path(name: str) -> Path:
    return key_dir() / f"worker-{name}.pem"


def coordinator_key_path() -> Path:
    return key_dir() / "coordinator.pem"


@dataclass(frozen=True)
class Identity:
    """A private key and the public key the share shows for it."""

    key: Ed25519PrivateKey
    public: str
    path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, message: bytes) -> str:
        return sign(self.key, message)


def sealing_key_path(signing_key: Path) -> Path:
    """The coordinator's key for opening sealed updates: an age identity file beside its signing key."""
    return signing_key.with_suffix(".age")


def _private(path: Path, create: bool, content: Callable[[], bytes], absent: str = "") -> bool:
    """Make sure the private key file at `path` exists (created from `content()` when absent and `create`; else
    refused, with `absent` as the advice) and only this user can read it; whether it was created now."""
    created = False
    if not path.exists():
        if not create:
            advice = absent or "start the coordinator on this machine first, or pass --key"
            raise TrustError(f"no key at {path}: {advice}")
        _create(path, content())
        created = True
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise TrustError(f"{path} can be read by other users of this machine: `chmod 600 {path}`")
    return created


def load_sealing_identity(path: Path, create: bool = True, absent: str = "") -> tuple[SealingIdentity, bool]:
    """The age identity at `path` (created, mode 0600, when absent and `create`; else refused with the advice
    `absent`); whether it was created. `age -d -i PATH` opens an update with the same file (docs/PROTOCOL.md
    section 5.15)."""
    created = _private(path, create, lambda: SealingIdentity.generate().text().encode(), absent)
    try:
        return SealingIdentity.parse(path.read_text()), created
    except (NotAKey, UnicodeDecodeError, ValueError) as e:
        raise TrustError(f"{path} is not an age identity file (AGE-SECRET-KEY-1…): {e}") from None


def load_identity(path: Path, create: bool = True) -> tuple[Identity, bool]:
    """The key at `path`, created (mode 0600, folder 0700) when absent and `create`; whether it was created."""
    created = _private(path, create, lambda: Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise TrustError(f"{path} is not a fedsync key (a PEM Ed25519 private key without password): {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return Identity(key, public_text(key), path), created


def _create(path: Path, content: bytes) -> None:
    """Write a new key under a temporary name and link it into place, so two starts never swap keys."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique: threads of one process too
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: use that one
    finally:
        tmp.unlink()


def pinned_coordinator(run_id: str, offered: str, given: str | None) -> tuple[str, bool]:
    """The coordinator key a worker trusts for `run_id`: `given` (--coordinator-key) when set, else the one pinned
    at first contact (pinned now from `offered` when this machine never saw the run); whether it was pinned now.
    A fedsync.yaml whose key differs is a TrustError: someone other than the coordinator wrote it."""
    if given is not None:
        given = _key(given, "--coordinator-key")  # keys are their bytes: a copy padded otherwise is the same key
        if _key(offered, "fedsync.yaml's coordinator key") != given:
            raise TrustError(f"fedsync.yaml names coordinator key {fingerprint(offered)}, not the "
                             f"{fingerprint(given)} given with --coordinator-key: this is not your coordinator's run")
        return given, False
    pin = key_dir() / "coordinators" / f"{run_id}.pub"
    if pin.exists():
        known = pin.read_text().strip()
        if _key(known, f"the key pinned in {pin}") != _key(offered, "fedsync.yaml's coordinator key"):
            raise TrustError(f"fedsync.yaml of run {run_id} names coordinator key {fingerprint(offered)}, but this "
                             f"machine pinned {fingerprint(known)} when it first saw the run ({pin}): someone "
                             "rewrote fedsync.yaml. If the coordinator's key really changed, delete that file")
        return known, False
    pin.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(pin, (offered + "\n").encode())
    return offered, True


def _key(text: str, what: str) -> str:
    try:
        return canonical_public(text)
    except MarkerError as e:
        raise TrustError(f"{what} is unusable: {e}") from None


def round_secret_path(run_id: str, worker: str, r: int) -> Path:
    """Where a worker keeps its secrets of one secure-aggregation round: on its own disk, never in the share, so a
    restarted worker continues the round with the same keys (docs/PROTOCOL.md section 5.16)."""
    return key_dir() / "secagg" / f"{run_id}-{worker}-{r:06d}.secret"


def keep_round_secret(path: Path, make: Callable[[], bytes]) -> bytes:
    """The secret at `path`: made by `make` and stored (mode 0600) when none is there yet."""
    if not path.exists():
        _create(path, make())
    return path.read_bytes()


def forget_round_secrets(run_id: str, worker: str, before: int) -> None:
    """Delete this worker's secrets of the run's rounds before `before` (those rounds are closed)."""
    folder = key_dir() / "secagg"
    if folder.is_dir():
        for path in folder.glob(f"{run_id}-{worker}-*.secret"):
            if int(path.stem.rsplit("-", 1)[1]) < before:
                path.unlink(missing_ok=True)
