"""A process's log: event lines, a progress line on a terminal only, JSON lines for log collectors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from fedsync.base import logs
from fedsync.base.logs import CLEAR_LINE, Logger
from fedsync.learning import train
from fedsync.learning.tasks import get_task
from fedsync.run.config import load_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_line_lives_under_the_events_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.NO_PROGRESS, raising=False)
    screen = Terminal()
    log = Logger("worker w1", stream=screen)
    log.progress("round 1: step 10/40")
    log("round 1: rejected nothing")
    log.progress("")
    out = screen.getvalue()
    assert out.startswith(CLEAR_LINE + "round 1: step 10/40" + CLEAR_LINE)  # cleared before the event line...
    assert out.index("[worker w1] round 1: rejected nothing\nround 1: step 10/40") > 0  # ...and drawn again after
    assert out.endswith(CLEAR_LINE)
    for stream, env in ((io.StringIO(), None), (Terminal(), "1")):  # redirected, or the demo's children
        if env:
            monkeypatch.setenv(logs.NO_PROGRESS, env)
        quiet = Logger("coordinator", stream=stream)
        quiet.progress("round 2: 1 of 2 updates accepted")
        quiet("round 2 closed")
        assert CLEAR_LINE not in stream.getvalue() and "accepted" not in stream.getvalue()
        assert stream.getvalue().endswith("[coordinator] round 2 closed\n")


def test_json_lines_are_one_object_per_event_and_never_a_progress_line() -> None:
    screen = Terminal()
    log = Logger("worker w1", json_lines=True, stream=screen)
    log.progress("round 1: step 10/40")
    log("registered for run x")
    log("WARNING: training on the CPU although a GPU is present")
    events = [json.loads(line) for line in screen.getvalue().splitlines()]
    assert [e["level"] for e in events] == ["info", "warning"] and events[0]["role"] == "worker w1"
    assert events[0]["message"] == "registered for run x" and events[0]["time"].endswith("+00:00")


def test_local_training_reports_how_far_it_got(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "REPORT_EVERY_S", 0.0)
    cfg = load_config("digits")
    data = get_task("digits").load(None, cfg.data_options()).train
    heard: list[tuple[int, int, float, float]] = []
    settings = train.TrainSettings(epochs=1, batch_size=64, lr=0.05, momentum=0.9, weight_decay=0.0, augment=None)
    train.local_train(get_task("digits").build_model("digits_cnn", seed=0), data.subset(list(range(320))), settings,
                      "cpu", seed=0, report=lambda *a: heard.append(a))
    assert [h[0] for h in heard] == [1, 2, 3, 4, 5] and all(h[1] == 5 for h in heard)
    assert all(torch.isfinite(torch.tensor(h[2])) and h[3] > 0 for h in heard)
