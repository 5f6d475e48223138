"""Which serving worker runs which chunk of an inference job: a pure function of what is done, what each live
worker holds and how fast each is, so the submitter can recompute it after every change and a test can check it.

Each worker holds a short queue (QUEUE chunks): one it runs and the next, so it never waits for the plan to be
rewritten between chunks. A worker that finishes sooner takes the next pending chunk sooner, so fast machines end
up with more chunks in proportion to their speed. When nothing is pending, an idle worker also takes a copy of a
chunk another worker holds if, at its measured speed, it would finish it first (the first verified output wins):
a slow or stalled machine never holds up the job's end. A worker that stops heartbeating is simply not live: its
chunks are pending again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

QUEUE = 2


def route(rows: Sequence[int], done: set[int], queues: Mapping[str, list[int]], speeds: Mapping[str, float],
          depth: int = QUEUE) -> dict[str, list[int]]:
    """New queues for the live workers (`speeds`: inputs per second, > 0) given each chunk's size (`rows`), the
    chunks whose output is taken (`done`) and the previous queues (a worker keeps what it holds, in order)."""
    kept = {w: [c for c in queues.get(w, []) if c not in done] for w in speeds}
    held = {c for q in kept.values() for c in q}
    pending = [c for c in range(len(rows)) if c not in done and c not in held]
    fastest_first = sorted(speeds, key=lambda w: (-speeds[w], w))
    while pending:
        room = [w for w in fastest_first if len(kept[w]) < depth]
        if not room:
            break
        for w in room:
            if pending:
                kept[w].append(pending.pop(0))
    if not pending:
        _back_up(rows, kept, speeds)
    return {w: q for w, q in kept.items() if q}


def _back_up(rows: Sequence[int], queues: dict[str, list[int]], speeds: Mapping[str, float]) -> None:
    """Give each idle worker the chunk that would otherwise finish last, when it would finish it sooner: a chunk
    still waiting in another's queue moves; the one another is running (the head of its queue) is copied, so that
    chunk is held by two workers at most."""
    for idle in sorted((w for w, q in queues.items() if not q), key=lambda w: (-speeds[w], w)):
        copies = {c for w, q in queues.items() for c in q[:1] if sum(c in o for o in queues.values()) > 1}
        best: tuple[float, str, int] | None = None
        for w, q in queues.items():
            finish = 0.0
            for i, c in enumerate(q):
                finish += rows[c] / speeds[w]
                if c not in copies and rows[c] / speeds[idle] < finish and (best is None or finish > best[0]):
                    best = (finish, w, i)
        if best is not None:
            _, w, i = best
            c = queues[w][i]
            if i > 0:
                del queues[w][i]
            queues[idle].append(c)
