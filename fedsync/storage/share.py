"""One run's share: its names (fedsync/storage/names.py) and the operations the roles perform on them, over a
Store. Knows nothing of training."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedsync.base.errors import ShareError
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.local import LocalStore
from fedsync.storage.markers import FileRef, parse
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.store import Entry, Signature, Store, read_upto
from fedsync.storage.yamlfile import MAX_YAML_BYTES, dump_yaml, parse_yaml

T = TypeVar("T")
# s3://, gs://, https://: a scheme of two letters or more (not C:/), then two slashes
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass(frozen=True)
class Share:
    """The files of one run, by name, on one Store (a local folder unless another is given)."""

    root: Path | str  # a folder (a Path, or a str without a scheme), or an object store's URL (s3://bucket/prefix)
    store: Store = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if isinstance(self.root, str) and URL.match(self.root):
            if self.store is None:
                from fedsync.storage.objects import ObjectStore  # obstore loads only for object-store shares
                try:
                    object.__setattr__(self, "store", ObjectStore(self.root))
                except ValueError as e:
                    raise ShareError(f"share {e}") from None
            return
        object.__setattr__(self, "root", Path(self.root))
        if self.store is None:
            object.__setattr__(self, "store", LocalStore(self.root))

    @classmethod
    def parse(cls, text: str) -> Share:
        """`--share` as a user types it: scheme://bucket/prefix is an object store, anything else a folder."""
        return cls(text)

    @property
    def identity(self) -> str:
        """The same string for every way of naming this share on this machine (local locks are keyed by it)."""
        return str(self.root.resolve()) if isinstance(self.root, Path) else self.root

    # -- names (fedsync/storage/names.py) ------------------------------------------------------------------

    manifest = names.MANIFEST
    trust = names.TRUST
    lease = names.LEASE
    workers_dir = names.WORKERS
    metrics = names.METRICS
    final_model = names.FINAL_MODEL
    final_marker = names.FINAL_MARKER

    worker_file = staticmethod(names.worker_file)
    round_dir = staticmethod(names.round_dir)
    global_model = staticmethod(names.global_model)
    assignment = staticmethod(names.assignment)
    updates_dir = staticmethod(names.updates_dir)
    update_tensors = staticmethod(names.update_tensors)
    update_marker = staticmethod(names.update_marker)
    summary = staticmethod(names.summary)
    evaluation = staticmethod(names.evaluation)
    server_state = staticmethod(names.server_state)
    model_after = staticmethod(names.model_after)

    def where(self, name: str = "") -> str:
        """Where a file is, for messages."""
        return self.store.describe(name)

    def path(self, name: str = "") -> Path:
        """A file's local path (folder shares only: tests and tools that inspect the folder)."""
        if not isinstance(self.root, Path):
            raise ShareError(f"{self.root} is an object store: its files have no local path")
        return self.root / name if name else self.root

    # -- reading -------------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.store.exists(name)

    def signature(self, name: str) -> Signature | None:
        return self.store.signature(name)

    def list(self, folder: str) -> list[Entry]:
        return self.store.list(folder)

    def read_yaml(self, name: str, limit: int = MAX_YAML_BYTES, follow_links: bool = True) -> Any:
        """A YAML file of the share: size-checked, safe types only, no aliases."""
        return parse_yaml(self.store.read(name, limit, follow_links))

    def read_record(self, cls: type[T], name: str) -> T:
        """A YAML file of the share parsed into its record (fedsync/storage/markers.py); MarkerError if malformed."""
        return parse(cls, self.read_yaml(name), name)

    def read_verified(self, name: str, ref: FileRef) -> bytes:
        """The file's bytes, only if they are exactly what the marker describes."""
        short = names.basename(name)
        try:
            with self.store.open(name) as f:
                if f.size != ref.bytes:
                    raise Unusable(Reason.SIZE_MISMATCH, f"{short} has {f.size} bytes, the marker says {ref.bytes}")
                data = bytearray(ref.bytes + 1)
                got = read_upto(f, memoryview(data))
        except FileNotFoundError:
            raise Unusable(Reason.MISSING_FILE, f"{short} is not there (yet)") from None
        if got != ref.bytes:
            raise Unusable(Reason.SIZE_MISMATCH, f"{short} changed size while being read")
        del data[got:]
        if hash_bytes(data) != ref.blake3:
            raise Unusable(Reason.HASH_MISMATCH, f"{short}: BLAKE3 differs from the marker's")
        return bytes(data)

    def rounds(self) -> list[int]:
        """Round numbers that have a folder, ascending."""
        return sorted(int(e.name) for e in self.store.list("") if names.ROUND_DIR.match(e.name))

    def closed_rounds(self) -> list[int]:
        """Round numbers that have a summary, ascending."""
        return [r for r in self.rounds() if self.store.exists(names.summary(r))]

    # -- writing: each name has one writer (docs/DESIGN.md, invariant 1) -----------------------------------

    def require(self) -> None:
        """Refuse a share that is not there: a typo, or a mount or sync that has not happened yet. A run started in
        its place would live on the local disk, hidden once the real share appears."""
        if not self.store.exists(""):
            raise ShareError(f"share folder {self.where()} does not exist: mount or sync it first, or fix --share")

    def check_present(self) -> None:
        """Raise ENOENT unless fedsync.yaml is there: it is written once and never removed, so its absence
        means the share is unmounted or gone. A write then would land in the bare mount point (or recreate the
        share's path on the local disk) and be hidden, so lost, when the share comes back; every writer
        retries an OSError with backoff instead."""
        if not self.store.exists(names.MANIFEST):
            raise FileNotFoundError(errno.ENOENT, "the share's fedsync.yaml is gone", self.where(names.MANIFEST))

    def write(self, name: str, data: bytes) -> None:
        """Write one of the run's files whole, only while the share is present: checked before and after, since the
        share can go away while the file is written (the file then lies in the bare mount point: removed again)."""
        self.check_present()
        self.store.write(name, data)
        try:
            self.check_present()
        except FileNotFoundError:
            self.store.remove(name)
            raise

    def write_if(self, name: str, data: bytes, previous: Signature | None) -> Signature:
        """Write only if the file is still what `previous` describes (None: only if absent); its new signature, or
        WriteConflict. Object stores only: a folder shared between machines has no compare-and-swap."""
        if not self.store.conditional_writes:
            raise TypeError("conditional writes need an object store")
        self.check_present()
        return self.store.write_if(name, data, previous)  # type: ignore[attr-defined]

    def write_yaml(self, name: str, obj: Any) -> None:
        self.write(name, dump_yaml(obj))

    def make_folder(self, name: str) -> None:
        """Create a folder of the run (and its parents inside the share), only while the share is present."""
        self.check_present()
        self.store.make_folder(name)

    def start(self, manifest: Any) -> None:
        """Create the share if needed and write fedsync.yaml: the one write allowed before the share is present."""
        self.store.make_folder("")
        self.store.write(names.MANIFEST, dump_yaml(manifest))

    def remove(self, name: str) -> None:
        self.store.remove(name)

    def remove_temporaries(self, folder: str, owned: set[str]) -> int:
        return self.store.remove_temporaries(folder, owned)
