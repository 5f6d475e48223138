"""The report thread: a finished run's report is drawn once more as it ends; an interrupted run does not wait for
a drawing (at low priority on a busy machine one takes tens of seconds)."""

from pathlib import Path

from fedsync.run.config import load_config
from fedsync.run.coordinating.report import Reporter
from fedsync.run.start import open_run
from fedsync.storage import names
from fedsync.storage.share import Share

from .helpers import coordinator_identity


def test_an_interrupted_run_stops_its_reporter_at_once_and_an_ending_one_draws_once_more(tmp_path: Path) -> None:
    s = Share(tmp_path)
    manifest = open_run(s, load_config("digits", {}), "coordinator", coordinator_identity())
    logs: list[str] = []
    interrupted = Reporter(s, manifest, logs.append)
    interrupted.close(draw=False)
    assert not interrupted.thread.is_alive() and not s.exists(names.REPORT_MD)  # returned, drawing nothing
    ending = Reporter(s, manifest, logs.append)
    ending.close()
    assert not ending.thread.is_alive() and s.exists(names.REPORT_MD) and s.exists(names.REPORT_PNG), logs
