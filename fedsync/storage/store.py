"""The storage seam: what fedsync does to a share, as operations on names, whatever the medium.

Every read and write of a share file goes through a Store; no module outside fedsync/storage opens, stats or
lists share files itself (tests/test_architecture.py checks it). The local-filesystem Store is
fedsync/storage/local.py; an object store implements the same operations (docs/DESIGN.md, "Storage").
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedsync.storage.reasons import Reason, Unusable

Signature = Hashable  # opaque: two equal signatures mean the file did not change, as far as the medium can tell


class OversizeError(ValueError):
    """A file in the share is larger than its kind may be."""


class WriteConflict(Exception):
    """A conditional write found the file changed (or present) since the writer last saw it: another writer won."""


class LinkRefused(OSError):
    """A read that must not follow symbolic links met one: it could point anywhere, outside the share included."""


@dataclass(frozen=True)
class Entry:
    """One name in a listed folder."""

    name: str            # the name inside the folder, temporaries and conflict copies included
    folder: bool
    signature: Signature
    modified: float      # POSIX seconds of the last change, by the medium's clock (for display only)


class Reader(Protocol):
    """A file opened for reading in pieces; `size` is fixed when it was opened."""

    size: int

    def readinto(self, view: memoryview) -> int: ...

    def tell(self) -> int: ...

    def seek(self, offset: int) -> int: ...


class Store(Protocol):
    """Operations on one share. Names are '/'-separated and relative to the share (fedsync/storage/names.py);
    "" is the share itself. Absent files raise FileNotFoundError; share trouble raises other OSErrors."""

    # What the medium can do, asked by the watcher, the lease and the Syncthing nudge instead of guessing from a path:
    local_folder: Path | None  # the folder on this machine that is the share (inotify, Syncthing); None: none
    conditional_writes: bool   # write_if: a write that fails when the file changed since it was last seen

    def describe(self, name: str) -> str:
        """Where the file is, for messages a person reads (a local path, a URL)."""
        ...

    def read(self, name: str, limit: int, follow_links: bool = True) -> bytes:
        """The whole file; OversizeError before reading one larger than `limit` bytes."""
        ...

    def open(self, name: str, follow_links: bool = True) -> AbstractContextManager[Reader]:
        """The file for reading in pieces (large tensor files are never held whole)."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Make `data` appear under `name` whole or not at all (its folder is created if needed)."""
        ...

    def list(self, folder: str) -> list[Entry]:
        """The folder's entries, in no particular order; [] when the folder does not exist."""
        ...

    def signature(self, name: str) -> Signature | None:
        """The file's change signature, None when it is absent."""
        ...

    def exists(self, name: str) -> bool: ...

    def make_folder(self, name: str) -> None:
        """Create a folder (and its parents); an existing one is fine."""
        ...

    def remove(self, name: str) -> None:
        """Remove a file, or a folder with everything in it; an absent one is fine."""
        ...

    def remove_temporaries(self, folder: str, owned: set[str]) -> int:
        """Delete temporary files an interrupted writer left for the given final names in `folder`; how many.
        Only the single writer of those names may call this (docs/DESIGN.md, invariant 1)."""
        ...


def read_upto(f: Reader, view: memoryview) -> int:
    """Fill `view` from the file, short only at its end; how many bytes were read."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_exact(f: Reader, view: memoryview) -> None:
    """Fill `view` from the file; a file that ends first is unusable (truncated while being read)."""
    if read_upto(f, view) < len(view):
        raise Unusable(Reason.SIZE_MISMATCH, "the file ended early (truncated while being read)")
