"""Routing an inference job's chunks (fedsync/run/submitting/routing.py): a pure function, checked case by case."""

from __future__ import annotations

from fedsync.run.submitting.routing import route


def test_each_live_worker_gets_a_short_queue_fastest_first() -> None:
    queues = route([100] * 10, set(), {}, {"slow": 10.0, "fast": 100.0})
    assert queues == {"fast": [0, 2], "slow": [1, 3]}


def test_a_worker_keeps_what_it_holds_and_takes_the_next_pending_chunk_when_one_is_done() -> None:
    queues = route([100] * 10, {0}, {"fast": [0, 2], "slow": [1, 3]}, {"slow": 10.0, "fast": 100.0})
    assert queues == {"fast": [2, 4], "slow": [1, 3]}


def test_fast_workers_end_up_with_more_chunks_in_proportion_to_their_speed() -> None:
    """A simulation: each worker finishes the head of its queue at its own speed; the plan is recomputed after
    every finished chunk, as the submitter does."""
    rows, speeds = [100] * 60, {"fast": 300.0, "slow": 100.0}
    done: dict[int, str] = {}
    queues: dict[str, list[int]] = route(rows, set(), {}, speeds)
    clock, busy_until = 0.0, {w: rows[0] / s for w, s in speeds.items()}
    while len(done) < len(rows):
        w = min(busy_until, key=lambda x: busy_until[x])
        clock = busy_until[w]
        if queues.get(w):
            chunk = queues[w][0]
            done.setdefault(chunk, w)
        queues = route(rows, set(done), queues, speeds)
        busy_until[w] = clock + (rows[queues[w][0]] / speeds[w] if queues.get(w) else 0.1)
    by = {w: sum(1 for x in done.values() if x == w) for w in speeds}
    assert sum(by.values()) == len(rows)
    assert 2.5 <= by["fast"] / by["slow"] <= 3.5, by


def test_a_worker_that_stops_heartbeating_loses_its_chunks_to_the_others() -> None:
    # "gone" is not live any more (not in speeds): what it held is pending again, first come
    queues = route([100] * 6, {0}, {"gone": [1, 3], "ok": [0, 2]}, {"ok": 50.0})
    assert queues == {"ok": [2, 1]}
    assert route([100] * 6, {0, 2}, queues, {"ok": 50.0}) == {"ok": [1, 3]}


def test_at_the_tail_an_idle_faster_worker_takes_a_waiting_chunk_or_copies_a_running_one() -> None:
    speeds = {"fast": 100.0, "slow": 10.0}
    # nothing pending: the slow worker's waiting chunk moves to the idle fast one
    assert route([100] * 4, {0, 1}, {"slow": [2, 3], "fast": []}, speeds) == {"slow": [2], "fast": [3]}
    # the slow worker is running its last chunk: the fast one runs a copy (the first verified output wins)
    assert route([100] * 4, {0, 1, 3}, {"slow": [2], "fast": [3]}, speeds) == {"slow": [2], "fast": [2]}
    # a chunk is held by two workers at most
    three = {"a": 100.0, "b": 100.0, "slow": 10.0}
    queues = route([100] * 4, {0, 1, 3}, {"slow": [2], "a": [], "b": []}, three)
    assert sorted(w for w, q in queues.items() if 2 in q) == ["a", "slow"] and "b" not in queues


def test_equal_workers_never_copy_each_others_chunks() -> None:
    speeds = {"a": 50.0, "b": 50.0}
    assert route([100] * 3, {0, 1}, {"a": [2], "b": []}, speeds) == {"a": [2]}
