"""The share's layout, whole-file writes, hashing and safe reading; knows nothing of training.

Every path a fedsync process touches is named here, so docs/PROTOCOL.md and the code cannot drift apart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from filelock import FileLock

    from fedsync.storage.markers import FileRef

import blake3
import yaml

from fedsync.base import faults
from fedsync.storage.reasons import Reason, Unusable

T = TypeVar("T")
MAX_YAML_BYTES = 1 << 20  # markers are tiny; anything bigger is refused before it is read
ROUND_DIR = re.compile(r"^\d{4,9}$")
WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Share:
    """Paths inside one share folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "fedsync.yaml"

    @property
    def workers_dir(self) -> Path:
        return self.root / "workers"

    def worker_file(self, name: str) -> Path:
        return self.workers_dir / f"{name}.yaml"

    def round_dir(self, r: int) -> Path:
        return self.root / f"{r:04d}"

    def global_model(self, r: int) -> Path:
        return self.round_dir(r) / "global.safetensors"

    def assignment(self, r: int) -> Path:
        return self.round_dir(r) / "assignment.yaml"

    def updates_dir(self, r: int) -> Path:
        return self.round_dir(r) / "updates"

    def update_tensors(self, r: int, worker: str) -> Path:
        return self.updates_dir(r) / f"{worker}.safetensors"

    def update_marker(self, r: int, worker: str) -> Path:
        return self.updates_dir(r) / f"{worker}.yaml"

    def summary(self, r: int) -> Path:
        return self.round_dir(r) / "summary.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def final_model(self) -> Path:
        return self.root / "final.safetensors"

    @property
    def final_marker(self) -> Path:
        return self.root / "final.yaml"

    def model_after(self, r: int, last_round: int) -> Path:
        """Where the aggregate of round r lives: the next round's global model, or the final one."""
        return self.final_model if r >= last_round else self.global_model(r + 1)

    def rounds(self) -> list[int]:
        """Round numbers that have a folder, ascending."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if ROUND_DIR.match(n))

    def closed_rounds(self) -> list[int]:
        """Round numbers that have a summary, ascending."""
        return [r for r in self.rounds() if self.summary(r).exists()]

    def check_present(self) -> None:
        """Raise ENOENT unless fedsync.yaml is there: it is written once and never removed, so its absence
        means the share is unmounted or gone. A write then would land in the bare mount point (or recreate the
        share's path on the local disk) and be hidden, so lost, when the share comes back; every writer
        retries an OSError with backoff instead."""
        if not self.manifest.exists():
            raise FileNotFoundError(errno.ENOENT, "the share's fedsync.yaml is gone", str(self.manifest))

    def write(self, path: Path, data: bytes) -> None:
        """Write one of the run's files whole (atomic_write), only while the share is present."""
        self.check_present()
        atomic_write(path, data)

    def write_yaml(self, path: Path, obj: Any) -> None:
        self.write(path, dump_yaml(obj))

    def make_folder(self, path: Path) -> None:
        """Create a folder of the run (and its parents inside the share), only while the share is present."""
        self.check_present()
        path.mkdir(parents=True, exist_ok=True)


def is_temporary(name: str) -> bool:
    """Files still being written (ours or a sync tool's): never read them."""
    return name.startswith(".") or name.endswith(".tmp") or name.startswith("~syncthing~")


def is_conflict_copy(name: str) -> bool:
    """Syncthing's copy of a file two machines changed: reported, never read."""
    return ".sync-conflict-" in name


def check_worker_name(name: str) -> str:
    """Worker names become file names in the share, so they are restricted to a portable alphabet."""
    if not WORKER_NAME.match(name):
        raise ValueError(
            f"worker name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def atomic_write(path: Path, data: bytes) -> None:
    """Make `data` appear at `path` whole or not at all (DESIGN invariant 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot-name ending .tmp in the same folder: readers skip it, and rename stays within one filesystem.
    tmp = f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # Every step goes through one handle on the folder, so a write that began in it ends in it (or is cleaned
    # up there) even if the share's mount drops in between and its path now names a bare mount point.
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=folder), "wb") as f:
                if faults.crashes_writing(path):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    faults.die()
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            # atomic on POSIX: a reader sees the old file or the new one
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException as e:
            with contextlib.suppress(OSError):  # a share that refuses the write may refuse this too
                os.unlink(tmp, dir_fd=folder)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)  # a failed write() (a full disk) names no file; the report must
            elif isinstance(e, OSError):
                e.filename = str(path.parent / e.filename)  # a name relative to the folder: say where
            raise
        with contextlib.suppress(OSError):
            os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def remove_stale_temps(folder: Path, owned: set[str]) -> int:
    """Delete temporary files a killed writer left for the given final names; return how many.

    Only the single writer of those names may call this (DESIGN invariant 1), so no live write is touched.
    """
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        stem = name[1:].rsplit(".", 2)[0] if name.startswith(".") and name.endswith(".tmp") else None
        if stem in owned:
            (folder / name).unlink(missing_ok=True)
            removed += 1
    return removed


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def read_limited(path: Path, limit: int) -> bytes:
    """Read a whole file, refusing (before reading) one larger than `limit` bytes."""
    size = os.stat(path).st_size
    if size > limit:
        raise OversizeError(f"{path.name} is {size} bytes, over the {limit}-byte limit")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OversizeError(f"{path.name} grew past the {limit}-byte limit while being read")
    return data


def read_verified(path: Path, ref: FileRef) -> bytes:
    """The file's bytes, only if they are exactly what the marker describes."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise Unusable(Reason.MISSING_FILE, f"{path.name} is not there (yet)") from None
    if size != ref.bytes:
        raise Unusable(Reason.SIZE_MISMATCH, f"{path.name} has {size} bytes, the marker says {ref.bytes}")
    with open(path, "rb") as f:
        data = f.read(ref.bytes + 1)
    if len(data) != ref.bytes:
        raise Unusable(Reason.SIZE_MISMATCH, f"{path.name} changed size while being read")
    if hash_bytes(data) != ref.blake3:
        raise Unusable(Reason.HASH_MISMATCH, f"{path.name}: BLAKE3 differs from the marker's")
    return data


OS_TROUBLE = {
    errno.ENOSPC: "the share's disk is full",
    errno.EDQUOT: "the share's quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the share is mounted read-only",
    errno.ESTALE: "stale network file handle (the server restarted or the share was remounted)",
    errno.ENOTCONN: "the share is disconnected (its FUSE or network mount is gone)",
    errno.ENOENT: "a file or folder vanished (is the share unmounted?)",
    errno.EIO: "input/output error on the share",
}


def explain(e: OSError) -> str:
    """One line a person can act on, naming the file."""
    where = f": {e.filename}" if e.filename else ""
    return OS_TROUBLE.get(e.errno or 0, e.strerror or str(e)) + where


class Backoff:
    """Retry delays for share trouble: 0.5 s doubling to 30 s, reset by a success."""

    def __init__(self, log: Callable[[str], None], first: float = 0.5, cap: float = 30.0) -> None:
        self.log, self.first, self.cap, self.delay = log, first, cap, first

    def failed(self, e: Exception, what: str) -> float:
        delay = self.delay
        problem = explain(e) if isinstance(e, OSError) else str(e)
        self.log(f"share trouble while {what}: {problem}; retrying in {delay:.1f} s")
        self.delay = min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    def run(self, action: Callable[[], T], what: str,
            retry: tuple[type[Exception], ...] = (OSError,)) -> T:
        """Run an idempotent step until it succeeds, sleeping between attempts at the errors in `retry`."""
        while True:
            try:
                result = action()
            except retry as e:
                time.sleep(self.failed(e, what))
                continue
            self.reset()
            return result


class RepeatedWrite:
    """Share trouble of a write that repeats on its own clock (a heartbeat, the lease): reported in one line
    when it starts and in one when it ends, never once per attempt."""

    def __init__(self, log: Callable[[str], None], what: str, every: str) -> None:
        self.log, self.what, self.every = log, what, every
        self.failing = False

    def attempt(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            if not self.failing:
                self.log(f"share trouble writing {self.what}: {explain(e)}; retrying {self.every}")
            self.failing = True
            return
        if self.failing:
            self.log(f"{self.what} written again")
        self.failing = False


class OversizeError(ValueError):
    """A file in the share is larger than its kind may be."""


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases, which no fedsync file needs and YAML bombs rely on."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(data: bytes) -> Any:
    return yaml.load(data, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path, limit: int = MAX_YAML_BYTES) -> Any:
    """Load a YAML file from the share: size-checked, safe types only, no aliases."""
    return parse_yaml(read_limited(path, limit))


def dump_yaml(obj: Any) -> bytes:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode()


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write(path, dump_yaml(obj))


def local_lock(root: Path, role: str) -> FileLock:
    """A lock that stops two processes on this machine acting as the same role on one share.

    It lives in the local temp folder, never in the share: file locks are not reliable across machines
    (NFS, SMB and sync tools each behave differently), and a lock file in the share would be synced.
    """
    import hashlib
    import tempfile

    from filelock import FileLock

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fedsync-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{key}-{role}.lock"), timeout=0)
