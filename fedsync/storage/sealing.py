"""Updates sealed to the coordinator: the age file format (age-encryption.org/v1) with one X25519 recipient, so the
standard `age` tool opens any update by hand (docs/PROTOCOL.md section 5.15).

Every primitive is the `cryptography` package's: X25519, HKDF-SHA-256, HMAC-SHA-256 and ChaCha20-Poly1305. What
this module adds is the format's framing as the age specification fixes it (header lines, the 64 KiB chunks and
their 12-byte nonces); tests/test_sealing.py checks it byte for byte against two independent implementations
(rage through pyrage, and the `age` command). The payload is seekable: a reader decrypts only the chunks it needs,
one at a time, so memory stays O(chunk) and the intake keeps streaming.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from hmac import compare_digest

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsync.storage.hashing import Hasher, hash_bytes
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.store import Reader, read_exact

SCHEME = "age"  # what an update marker's `encryption` says
VERSION_LINE = b"age-encryption.org/v1\n"
CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = CHUNK + TAG
BATCH = 16  # sealed chunks a reader takes from the file in one read: 1 MiB, the intake's piece
NONCE = 16  # the payload's random nonce, right after the header
MAC_LINE = 48  # the header's last line: "--- ", the MAC in 43 base64 characters, "\n"
MAX_HEADER = 8192  # an X25519 stanza takes about 100 bytes; room for a few stanzas of other recipient types
X25519_INFO = b"age-encryption.org/v1/X25519"
RECIPIENT_HRP = "age"
IDENTITY_HRP = "age-secret-key-"


class NotAKey(ValueError):
    """Text that is not an age recipient or identity."""


# --- Bech32 (BIP 173, without its length limit, as the age specification uses it) -------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    check = 1
    for v in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            check ^= _GENERATOR[i] if (top >> i) & 1 else 0
    return check


def _expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: bytes | list[int], source: int, target: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    for value in data:
        acc = acc << source | value
        bits += source
        while bits >= target:
            bits -= target
            out.append(acc >> bits & (1 << target) - 1)
    if pad and bits:
        out.append(acc << target - bits & (1 << target) - 1)
    elif not pad and (bits >= source or acc & (1 << bits) - 1):
        raise NotAKey("its padding bits are not zero")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    words = _regroup(data, 8, 5, True)
    check = _polymod(_expand(hrp) + words + [0] * 6) ^ 1
    return hrp + "1" + "".join(_CHARSET[w] for w in words + [check >> 5 * (5 - i) & 31 for i in range(6)])


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise NotAKey("it mixes upper and lower case")
    text = text.lower()
    hrp, sep, rest = text.rpartition("1")
    if not sep or not hrp or len(rest) < 6 or any(c not in _CHARSET for c in rest):
        raise NotAKey("it is not Bech32")
    words = [_CHARSET.index(c) for c in rest]
    if _polymod(_expand(hrp) + words) != 1:
        raise NotAKey("its checksum is wrong (a typo?)")
    return hrp, bytes(_regroup(words[:-6], 5, 8, False))


# --- keys ----------------------------------------------------------------------------------------------------------

def recipient_key(text: str) -> X25519PublicKey:
    """An `age1…` recipient's public key; NotAKey when the text is not one."""
    hrp, raw = bech32_decode(text.strip())
    if hrp != RECIPIENT_HRP or len(raw) != 32:
        raise NotAKey(f"{text.strip()[:12]}… is not an age X25519 recipient (age1…)")
    return X25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SealingIdentity:
    """The coordinator's private X25519 key, as an age identity file holds it (AGE-SECRET-KEY-1…)."""

    key: X25519PrivateKey

    @classmethod
    def generate(cls) -> SealingIdentity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> SealingIdentity:
        """The first key line of an age identity file (comment lines start with #)."""
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not lines:
            raise NotAKey("no AGE-SECRET-KEY-1… line")
        hrp, raw = bech32_decode(lines[0])
        if hrp != IDENTITY_HRP or len(raw) != 32:
            raise NotAKey("its key line is not an age X25519 identity (AGE-SECRET-KEY-1…)")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def recipient(self) -> str:
        return bech32_encode(RECIPIENT_HRP, self.key.public_key().public_bytes_raw())

    def text(self) -> str:
        """The identity file's content, as `age-keygen` writes it."""
        secret = bech32_encode(IDENTITY_HRP, self.key.private_bytes_raw()).upper()
        return f"# fedsync coordinator's key for reading updates\n# public key: {self.recipient}\n{secret}\n"


# --- the format ----------------------------------------------------------------------------------------------------

def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes, size: int) -> bytes:
    """Canonical unpadded base64 of exactly `size` bytes, as the specification requires of a reader."""
    try:
        raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("a header field is not base64") from None
    if len(raw) != size or _b64(raw) != text:
        raise _bad("a header field is not canonical base64 of the right length")
    return raw


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _mac(file_key: bytes, header: bytes) -> bytes:
    h = hmac.HMAC(_hkdf(file_key, b"", b"header"), hashes.SHA256())
    h.update(header)
    return h.finalize()


def _bad(detail: str) -> Unusable:
    return Unusable(Reason.UNDECRYPTABLE, detail)


def chunks(plain: int) -> int:
    """How many chunks hold `plain` bytes (an empty payload is one empty final chunk)."""
    return max(1, -(-plain // CHUNK))


def seal(data: bytes | bytearray | memoryview, recipient: str) -> bytes:
    """`data` encrypted to `recipient` (an age1… text) as one age file."""
    public = recipient_key(recipient)
    file_key = os.urandom(16)
    secret = X25519PrivateKey.generate()
    share = secret.public_key().public_bytes_raw()
    wrap = _hkdf(secret.exchange(public), share + public.public_bytes_raw(), X25519_INFO)
    body = ChaCha20Poly1305(wrap).encrypt(bytes(12), file_key, None)
    header = VERSION_LINE + b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n---"
    header += b" " + _b64(_mac(file_key, header)) + b"\n"
    nonce = os.urandom(NONCE)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    view, n = memoryview(data).cast("B"), chunks(len(data))
    out = bytearray(len(header) + NONCE + len(view) + TAG * n)
    out[:len(header)] = header
    out[len(header):len(header) + NONCE] = nonce
    at = len(header) + NONCE
    for i in range(n):
        piece = view[i * CHUNK:(i + 1) * CHUNK]
        aead.encrypt_into(_nonce(i, i == n - 1), piece, None, memoryview(out)[at:at + len(piece) + TAG])
        at += len(piece) + TAG
    return bytes(out)


def sealed_head(data: bytes | bytearray | memoryview) -> str:
    """The BLAKE3 of an age file's header and payload nonce: with them fixed, the file key and the payload key are
    fixed, and the payload's tags prove every other byte (docs/PROTOCOL.md section 5.15)."""
    view = memoryview(data).cast("B")
    mac_at, _ = _stanzas(bytes(view[:MAX_HEADER]))
    return hash_bytes(bytes(view[:mac_at + MAC_LINE + NONCE]))


def _stanzas(block: bytes) -> tuple[int, list[tuple[list[bytes], bytes]]]:
    """Where an age header's MAC line begins, and its recipient stanzas' arguments and bodies."""
    if not block.startswith(VERSION_LINE):
        raise _bad("not an age file (no age-encryption.org/v1 line)")
    at, stanzas = len(VERSION_LINE), []
    while block.startswith(b"-> ", at):
        end = block.find(b"\n", at)
        if end < 0:
            raise _bad("the header is cut short")
        args = block[at + 3:end].split(b" ")
        body, at = b"", end + 1
        while True:  # the body: lines of 64 base64 characters, ending with a shorter one
            end = block.find(b"\n", at)
            if end < 0 or end - at > 64:
                raise _bad("a recipient stanza's body is malformed")
            body, full, at = body + block[at:end], end - at == 64, end + 1
            if not full:
                break
        stanzas.append((args, body))
    end = at + MAC_LINE
    if not block.startswith(b"--- ", at) or len(block) < end or block[end - 1:end] != b"\n":
        raise _bad("the header does not end with its MAC line")
    return at, stanzas


def _header(block: bytes, identity: SealingIdentity) -> tuple[int, bytes]:
    """The header's length and the file key it wraps for `identity`."""
    at, stanzas = _stanzas(block)
    file_key = None
    for args, body in stanzas:
        if args[0] == b"X25519" and file_key is None:
            file_key = _unwrap(args, body, identity)
    if file_key is None:
        raise _bad(f"it is not sealed to this coordinator's key ({identity.recipient[:16]}…)")
    if not compare_digest(_mac(file_key, block[:at + 3]), _unb64(block[at + 4:at + 47], 32)):
        raise _bad("its header's MAC does not verify (edited, or not sealed to this key)")
    return at + MAC_LINE, file_key


def _unwrap(args: list[bytes], body: bytes, identity: SealingIdentity) -> bytes | None:
    """The file key from an X25519 stanza, or None when the stanza is for another key."""
    if len(args) != 2:
        raise _bad("an X25519 stanza needs exactly one argument")
    share = _unb64(args[1], 32)
    wrapped = _unb64(body, 32)
    shared = identity.key.exchange(X25519PublicKey.from_public_bytes(share))
    if shared == bytes(32):
        raise _bad("an X25519 stanza holds a low-order point")
    own = identity.key.public_key().public_bytes_raw()
    try:
        return ChaCha20Poly1305(_hkdf(shared, share + own, X25519_INFO)).decrypt(bytes(12), wrapped, None)
    except InvalidTag:
        return None


class SealedReader:
    """The plaintext of an age file, read in pieces and seekable (the Reader protocol, fedsync/storage/store.py).

    `hasher`, when given, is fed every byte of the sealed file read in order from its start (`hashed` of them so
    far): the intake's single pass checks the sealed file's hash (what the marker names) while it decrypts. With
    `whole` false it is fed the header and the payload nonce alone, which the marker's `sealed_head` names: the
    payload's tags prove the rest, and the bytes are not hashed a second time."""

    def __init__(self, raw: Reader, identity: SealingIdentity, hasher: Hasher | None = None,
                 whole: bool = True) -> None:
        self.raw, self.identity, self.hasher, self.whole = raw, identity, hasher, whole
        self.hashed = 0  # bytes of the sealed file hashed, in order from its start
        self.size = 0
        self.position = 0
        self.loaded = -1  # the chunk in `plain`
        self.sealed = bytearray(BATCH * SEALED_CHUNK)
        self.plain = bytearray(CHUNK)
        self.first = 0  # where the first chunk begins in the sealed file
        self.count = 0
        self.aead: ChaCha20Poly1305 | None = None

    def start(self) -> SealedReader:
        """Read and check the header: Unusable (undecryptable) when the file cannot be opened with the key."""
        block = bytearray(min(self.raw.size, MAX_HEADER))
        self.raw.seek(0)
        read_exact(self.raw, memoryview(block))
        length, file_key = _header(bytes(block), self.identity)
        if self.raw.size < length + NONCE + TAG:
            raise _bad("the payload is cut short")
        nonce = self._raw_at(length, NONCE)
        if self.hasher is not None:
            self.hasher.update(memoryview(block)[:length])
            self.hasher.update(nonce)
            self.hashed = length + NONCE
        self.aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self.first = length + NONCE
        payload = self.raw.size - self.first
        self.count = -(-payload // SEALED_CHUNK)
        last = payload - (self.count - 1) * SEALED_CHUNK
        if last < TAG or (last == TAG and self.count > 1):
            raise _bad("the payload ends in a partial or empty chunk")
        self.size = payload - TAG * self.count
        return self

    def _raw_at(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        self.raw.seek(offset)
        read_exact(self.raw, memoryview(out))
        return bytes(out)

    def _plain_length(self, i: int) -> int:
        return CHUNK if i < self.count - 1 else self.size - (self.count - 1) * CHUNK

    def _fetch(self, i: int, k: int) -> memoryview:
        """Chunks i..i+k-1 as they are in the file (hashed when they are the next bytes in order)."""
        at = self.first + i * SEALED_CHUNK
        n = min(k * SEALED_CHUNK, self.raw.size - at)
        view = memoryview(self.sealed)[:n]
        self.raw.seek(at)
        read_exact(self.raw, view)
        if self.hasher is not None and self.whole and self.hashed == at:
            self.hasher.update(view)
            self.hashed += n
        return view

    def _decrypt(self, i: int, sealed: memoryview, out: memoryview) -> None:
        assert self.aead is not None, "start() first"
        try:
            self.aead.decrypt_into(_nonce(i, i == self.count - 1), sealed, None, out)
        except InvalidTag:
            raise _bad(f"chunk {i} of {self.count} does not decrypt: the file was altered or cut") from None

    def readinto(self, view: memoryview) -> int:
        """Whole chunks that fit go straight from the file into `view` (one read for up to BATCH of them, no copy);
        a chunk the read starts or ends inside goes through `plain`."""
        view, got = view.cast("B") if view.format != "B" else view, 0
        while got < len(view) and self.position < self.size:
            i, offset = divmod(self.position, CHUNK)
            whole = 0
            while offset == 0 and whole < BATCH and i + whole < self.count and \
                    got + whole * CHUNK + self._plain_length(i + whole) <= len(view):
                whole += 1
            if whole:
                sealed = self._fetch(i, whole)
                for j in range(whole):
                    n = self._plain_length(i + j)
                    self._decrypt(i + j, sealed[j * SEALED_CHUNK:j * SEALED_CHUNK + n + TAG], view[got:got + n])
                    got += n
                    self.position += n
                continue
            if i != self.loaded:
                self.loaded = -1
                self._decrypt(i, self._fetch(i, 1), memoryview(self.plain)[:self._plain_length(i)])
                self.loaded = i
            n = min(len(view) - got, self._plain_length(i) - offset)
            view[got:got + n] = memoryview(self.plain)[offset:offset + n]
            got += n
            self.position += n
        return got

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int) -> int:
        self.position = offset
        return offset


def hash_rest(raw: Reader, hasher: Hasher, start: int, piece: memoryview) -> None:
    """Feed `hasher` the file from `start` to its end, unused (sealed: undecrypted): after a failure, whether the
    file was only not synced yet (its hash differs from the marker's) or bad."""
    raw.seek(start)
    while start < raw.size:
        n = min(len(piece), raw.size - start)
        read_exact(raw, piece[:n])
        hasher.update(piece[:n])
        start += n
