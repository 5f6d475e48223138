"""`fedsync status --watch`: the status redrawn as the share changes, a live view on a terminal (rich), plain
timestamped snapshots when the output is not one. Ctrl-C ends it."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedsync.cli.status import format_status
from fedsync.run.inspecting.status import collect_status
from fedsync.storage.share import Share
from fedsync.storage.watch import ShareWatcher

REDRAW_S = 1.0  # heartbeat ages move on even when no file changes


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.1f} MB"


def render(st: dict[str, Any]) -> Group:
    """The status as a header, the open round's progress, a table of workers and the last result."""
    head = Text(f"run {st['run_id']} ({st['task']}/{st['model']})", style="bold")
    state = f"round {st['round'] or '-'} of {st['rounds'] or '-'}: {st['state']}"
    if st["deadline_in_s"] is not None:
        state += f", deadline in ~{max(0.0, st['deadline_in_s']):.0f} s"
    lines = [head, Text(state)]
    if st["quorum"] is not None:  # a round is collecting
        lines.append(Text(f"updates: {len(st['accepted_open_round'])} accepted of {st['quorum']} for the quorum "
                          f"({len(st['submitted'])} of {len(st['assigned'])} assigned submitted)"))
    for x in st["rejected_open_round"]:
        lines.append(Text(f"rejected {x['worker']} ({x['reason']}): {x['detail']}", style="red"))
    last = st["last_closed"]
    if st["final"] is not None:
        lines.append(Text(f"finished after round {st['final']['round']}: test accuracy "
                          f"{st['final']['test_accuracy']:.4f}", style="green"))
    elif last and last["test_accuracy"] is not None:
        lines.append(Text(f"last closed round {last['round']}: test accuracy {last['test_accuracy']:.4f}"))
    table = Table(title=f"workers ({len(st['workers'])})", title_justify="left")
    for column in ("name", "state", "round", "device", "samples/s", "heartbeat", "sent"):
        table.add_column(column)
    for w in st["workers"]:
        if "problem" in w:
            table.add_row(w["name"], w["problem"], "", "", "", "", "")
            continue
        table.add_row(w["name"], w["state"], str(w["round"] or "-"), f"{w['device']} ({w['device_name']})",
                      f"{w['samples_per_s']:.0f}" if w["samples_per_s"] else "-",
                      f"{w['last_heartbeat_s']:.0f} s ago", _mb(w["sent_bytes"]))
    return Group(*lines, table)


def watch(share: Share, console: Console | None = None) -> None:
    """Redraw until Ctrl-C: at once when the share changes, else every REDRAW_S seconds."""
    console = console or Console()
    try:
        with ShareWatcher(share) as watcher:
            if console.is_terminal:
                with Live(render(collect_status(share)), console=console, auto_refresh=False) as live:
                    while True:
                        watcher.wait(REDRAW_S)
                        live.update(render(collect_status(share)), refresh=True)
            shown = ""
            while True:  # not a terminal: a snapshot whenever what it says changes (ages aside)
                text = format_status(collect_status(share))
                steady = "\n".join(line for line in text.splitlines() if "heartbeat" not in line)
                if steady != shown:
                    shown = steady
                    console.print(f"--- {time.strftime('%H:%M:%S')}\n{text}", markup=False, highlight=False)
                watcher.wait(REDRAW_S)
    except KeyboardInterrupt:
        return
