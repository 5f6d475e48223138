"""Wall-clock times written for people (when a file was written, when a round closed). Nothing decides by them:
liveness and deadlines count by each reader's own monotonic clock (docs/PROTOCOL.md section 4)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_stamp() -> str:
    """Now in UTC, ISO 8601 to the second: 2026-12-02T03:04:05+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
