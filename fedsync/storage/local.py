"""The Store on a local folder, a network mount (NFS, SMB, sshfs) or a synced folder (Syncthing).

Whole files appear by rename (docs/DESIGN.md, invariant 2); a change signature is (mtime, size, inode): a
rename gives a new inode even where mtimes are coarse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedsync.base import faults
from fedsync.storage import names
from fedsync.storage.store import Entry, LinkRefused, OversizeError, Signature, read_upto


class _Orphans:
    """Temporaries a failed write could not delete (the share had turned read-only or unwritable under it): deleted
    after this process's next successful write, when the share takes writes again, so a live writer leaves none."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paths: set[str] = set()

    def add(self, path: str) -> None:
        with self.lock:
            self.paths.add(path)

    def sweep(self) -> None:
        with self.lock:
            for p in list(self.paths):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # still refused: the next successful write tries again
                self.paths.discard(p)


ORPHANS = _Orphans()


def atomic_write(path: Path, data: bytes) -> None:
    """Make `data` appear at `path` whole or not at all (docs/DESIGN.md, invariant 2)."""
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
            try:
                os.unlink(tmp, dir_fd=folder)
            except FileNotFoundError:
                pass  # never created
            except OSError:  # a share that refuses the write may refuse this too: swept after a later write
                ORPHANS.add(str(path.parent / tmp))
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)  # a failed write() (a full disk) names no file; the report must
            elif isinstance(e, OSError):
                e.filename = str(path.parent / e.filename)  # a name relative to the folder: say where
            raise
        with contextlib.suppress(OSError):
            os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
    if ORPHANS.paths:
        ORPHANS.sweep()


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class _FileReader:
    f: BinaryIO
    size: int

    def readinto(self, view: memoryview) -> int:
        return self.f.readinto(view)  # type: ignore[attr-defined]

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int) -> int:
        return self.f.seek(offset)


@dataclass(frozen=True)
class LocalStore:
    root: Path
    conditional_writes = False  # a folder shared between machines has no compare-and-swap

    @property
    def local_folder(self) -> Path:
        return self.root

    def path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def describe(self, name: str) -> str:
        return str(self.path(name))

    def read(self, name: str, limit: int, follow_links: bool = True) -> bytes:
        with self.open(name, follow_links) as f:
            if f.size > limit:
                raise OversizeError(f"{names.basename(name)} is {f.size} bytes, over the {limit}-byte limit")
            data = bytearray(limit + 1)
            got = read_upto(f, memoryview(data))
        if got > limit:
            raise OversizeError(f"{names.basename(name)} grew past the {limit}-byte limit while being read")
        return bytes(data[:got])

    @contextlib.contextmanager
    def open(self, name: str, follow_links: bool = True) -> Iterator[_FileReader]:
        flags = os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW)
        try:
            fd = os.open(self.path(name), flags)
        except OSError as e:
            if e.errno == errno.ELOOP and not follow_links:
                raise LinkRefused(errno.ELOOP, f"{names.basename(name)} is a symbolic link",
                                  str(self.path(name))) from None
            raise
        with open(fd, "rb", buffering=0) as f:
            yield _FileReader(f, os.fstat(fd).st_size)

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.path(name), data)

    def list(self, folder: str) -> list[Entry]:
        out = []
        try:
            with os.scandir(self.path(folder)) as entries:
                for e in entries:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # replaced between listing and stat: the next listing sees the new one
                    out.append(Entry(e.name, e.is_dir(follow_symlinks=False), _signature(st), st.st_mtime))
        except FileNotFoundError:
            return []
        return out

    def signature(self, name: str) -> Signature | None:
        try:
            return _signature(os.stat(self.path(name)))
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def make_folder(self, name: str) -> None:
        self.path(name).mkdir(parents=True, exist_ok=True)

    def remove(self, name: str) -> None:
        path = self.path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def remove_temporaries(self, folder: str, owned: set[str]) -> int:
        removed = 0
        for e in self.list(folder):
            name = e.name
            stem = name[1:].rsplit(".", 2)[0] if name.startswith(".") and name.endswith(".tmp") else None
            if stem in owned:
                self.path(folder).joinpath(name).unlink(missing_ok=True)
                removed += 1
        return removed
