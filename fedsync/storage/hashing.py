"""BLAKE3, the share's file hash: markers name files with it, readers check it (docs/PROTOCOL.md section 3)."""

from __future__ import annotations

import blake3

Hasher = blake3.blake3  # incremental: update(piece) as a file is read, hexdigest() at the end


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
