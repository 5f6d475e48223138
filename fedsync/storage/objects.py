"""The Store on an object store: s3:// (AWS S3 and S3-compatible stores: Cloudflare R2, Backblaze B2, MinIO),
gs:// and az://, through obstore (the Rust object_store crate; docs/DESIGN.md, "Storage", says why).

An object is whole once its PUT completes, so there are no temporary names and no renames; a large object goes up
as a multipart upload, which the store shows only once it is complete. A change signature is (ETag, size). Folders
do not exist: a "folder" is the common prefix of its objects, listed by prefix with a delimiter
(docs/PROTOCOL.md, section 4, "On an object store").
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError
from obstore.store import from_url

from fedsync.storage import names
from fedsync.storage.store import Entry, OversizeError, Signature, WriteConflict

T = TypeVar("T")
SCHEMES = ("s3", "gs", "az")
PIECE = 8 << 20  # bytes per piece of a streamed read: large enough that one request per piece costs little
# obstore retries a failed request itself (10 times over up to 180 s by default); fedsync's writers already retry
# share trouble with backoff and report it, so a request gives up sooner and the caller decides.
RETRY = {"max_retries": 3, "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                                       "base": 2},
         "retry_timeout": timedelta(seconds=20)}


def _endpoint_is_http() -> bool:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    return endpoint.startswith("http://")


def _first_line(e: BaseError) -> str:
    """obstore's messages run to a page of debug detail; a person needs the first line."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _oserror(e: BaseError, where: str) -> OSError:
    """An object store's failure as the OSError every role already treats as share trouble (reported, retried)."""
    return OSError(errno.EIO, f"{type(e).__name__}: {_first_line(e)}", where)


class _ObjectReader:
    """One object read in pieces: a single streaming GET while reads are sequential, a ranged GET after a seek.
    Every GET names the ETag seen when the object was opened, so a replaced object fails the read instead of
    mixing two versions (a second writer would break docs/DESIGN.md, invariant 1; the hash catches it too)."""

    def __init__(self, store: ObjectStore, name: str, size: int, etag: str | None) -> None:
        self.store, self.name, self.size, self.etag = store, name, size, etag
        self.pos = 0
        self.chunks: Iterator[Any] | None = None  # the open GET's body from `pos` on; None after a seek
        self.buffer = memoryview(b"")  # what the body gave and was not read yet

    def _restart(self) -> None:
        options: dict[str, Any] = {"range": (self.pos, self.size)}
        if self.etag:
            options["if_match"] = self.etag
        result = self.store.call(self.name, lambda s: obstore.get(s, self.store.key(self.name), options=options))
        self.chunks = iter(result.stream(min_chunk_size=PIECE))

    def readinto(self, view: memoryview) -> int:
        if self.pos >= self.size or not len(view):
            return 0
        if not len(self.buffer):
            if self.chunks is None:
                self._restart()
            try:
                chunk = self.store.call(self.name, lambda s: next(self.chunks))  # type: ignore[arg-type]
            except StopIteration:
                return 0
            self.buffer = memoryview(chunk)
        n = min(len(view), len(self.buffer))
        view[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int) -> int:
        if offset != self.pos:
            self.pos, self.chunks, self.buffer = offset, None, memoryview(b"")
        return self.pos


class ObjectStore:
    """Operations on one share that lives under `url` (scheme://bucket/prefix) in an object store. Credentials and
    the endpoint come from the store's own environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL, AWS_REGION; GOOGLE_SERVICE_ACCOUNT; AZURE_STORAGE_ACCOUNT_NAME, ...)."""

    local_folder = None  # nothing on this machine to watch: only listing sees changes
    conditional_writes = True  # PUT If-Match / If-None-Match (write_if)

    def __init__(self, url: str) -> None:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise ValueError(f"{url}: fedsync reads shares from {', '.join(s + '://' for s in SCHEMES)} object "
                             "stores and from folders")
        self.url = url.rstrip("/")
        options: dict[str, Any] = {"client_options": {"connect_timeout": timedelta(seconds=5),
                                                      "timeout": timedelta(seconds=300)},
                                   "retry_config": RETRY}
        if scheme == "s3" and _endpoint_is_http():
            options["client_options"]["allow_http"] = True  # a local MinIO or test server: the user chose http
        try:
            self.store = from_url(self.url, **options)
        except BaseError as e:
            raise ValueError(f"{self.url}: {_first_line(e)}") from None

    @staticmethod
    def key(name: str) -> str:
        return name.strip("/")

    def call(self, name: str, op: Callable[[Any], T]) -> T:
        """Run one request; absent objects stay FileNotFoundError, every other failure becomes an OSError."""
        try:
            return op(self.store)
        except (FileNotFoundError, StopIteration):
            raise
        except BaseError as e:
            raise _oserror(e, self.describe(name)) from None

    def describe(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def _head(self, name: str) -> dict[str, Any]:
        return self.call(name, lambda s: obstore.head(s, self.key(name)))

    def read(self, name: str, limit: int, follow_links: bool = True) -> bytes:
        result = self.call(name, lambda s: obstore.get(s, self.key(name)))
        size = result.meta["size"]  # known from the response's headers: an oversized body is never read
        if size > limit:
            raise OversizeError(f"{names.basename(name)} is {size} bytes, over the {limit}-byte limit")
        data = self.call(name, lambda s: bytes(result.bytes()))
        if len(data) > limit:
            raise OversizeError(f"{names.basename(name)} grew past the {limit}-byte limit while being read")
        return data

    @contextlib.contextmanager
    def open(self, name: str, follow_links: bool = True) -> Iterator[_ObjectReader]:
        meta = self._head(name)  # an object store has no links: follow_links has nothing to refuse
        yield _ObjectReader(self, name, meta["size"], meta.get("e_tag"))

    def write(self, name: str, data: bytes) -> None:
        # obstore uploads anything over its chunk size (5 MiB) as a multipart upload, completed only at the end
        self.call(name, lambda s: obstore.put(s, self.key(name), data))

    def write_if(self, name: str, data: bytes, previous: Signature | None) -> Signature:
        """Write only if the object is still the one `previous` describes (None: only if there is none), as one
        conditional PUT (If-Match / If-None-Match, which S3, R2, GCS, Azure and MinIO honour); the new signature.
        WriteConflict when another writer got there first."""
        mode: Any = "create" if previous is None else {"e_tag": previous[0]}  # type: ignore[index]
        try:
            put = obstore.put(self.store, self.key(name), data, mode=mode)
        except (AlreadyExistsError, PreconditionError):
            raise WriteConflict(f"{self.describe(name)} changed since this writer last saw it") from None
        except BaseError as e:
            raise _oserror(e, self.describe(name)) from None
        return (put["e_tag"], len(data))

    def list(self, folder: str) -> list[Entry]:
        prefix = self.key(folder)
        listing = self.call(folder, lambda s: obstore.list_with_delimiter(s, prefix or None))
        cut = len(prefix) + 1 if prefix else 0
        out = [Entry(p[cut:].rstrip("/"), True, p, 0.0) for p in listing["common_prefixes"]]
        out += [Entry(o["path"][cut:], False, (o.get("e_tag"), o["size"]), o["last_modified"].timestamp())
                for o in listing["objects"]]
        return out

    def signature(self, name: str) -> Signature | None:
        try:
            meta = self._head(name)
        except FileNotFoundError:
            return None
        return (meta.get("e_tag"), meta["size"])

    def exists(self, name: str) -> bool:
        if not name:
            self.list("")  # the bucket answers (an absent bucket or bad credentials raise)
            return True
        return self.signature(name) is not None

    def make_folder(self, name: str) -> None:
        """Nothing to do: a folder exists once an object has its prefix."""

    def remove(self, name: str) -> None:
        key = self.key(name)
        inside = [o["path"] for page in self.call(name, lambda s: list(obstore.list(s, key + "/")))
                  for o in page] if key else []
        for start in range(0, len(inside), 1000):
            batch = inside[start:start + 1000]
            self.call(name, lambda s: obstore.delete(s, batch))
        if key:
            with contextlib.suppress(FileNotFoundError):
                self.call(name, lambda s: obstore.delete(s, key))

    def remove_temporaries(self, folder: str, owned: set[str]) -> int:
        return 0  # a PUT leaves no temporary object: an interrupted one never appears
