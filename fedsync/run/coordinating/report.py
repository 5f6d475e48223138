"""A run at a glance, read from its summaries and evaluations alone: the per-round table (`fedsync results`), its
curves as a PNG (`--plot`), and report.md with report.png, which the coordinator refreshes at the share's root after
each round so that a person browsing the folder sees them without running anything; and metrics.csv, one row per
closed round, which the coordinator rewrites whole as rounds close and their evaluations land."""

from __future__ import annotations

import csv
import io
import threading
import time
from dataclasses import dataclass, field

from fedsync.base.logs import Log
from fedsync.run.background import yield_cpu
from fedsync.storage import names
from fedsync.storage.markers import Accepted, Assignment, Evaluation, Manifest, Rejected, Summary, Traffic
from fedsync.storage.share import Share
from fedsync.storage.trouble import Backoff, RepeatedWrite


@dataclass
class RoundRow:
    round: int
    closed_because: str
    seconds: float
    accepted: int
    rejected: int
    train_loss: float
    test_accuracy: float | None   # None: not evaluated (yet, or eval_every skips it)
    test_loss: float | None
    down_bytes: int | None
    up_bytes: int | None
    closed_at: str | None
    train_s: dict[str, float] = field(default_factory=dict)  # accepted workers' training seconds
    compute: dict[str, float] = field(default_factory=dict)  # those seconds by device kind
    epsilon: float | None = None  # dp: the privacy budget spent through this round


def read_rows(share: Share) -> list[RoundRow]:
    """One row per closed round whose summary can be read, in order."""
    rows = []
    for r in share.closed_rounds():
        try:
            s = share.read_record(Summary, share.summary(r))
        except Exception:  # noqa: BLE001 - not synced whole yet: the next look has it
            continue
        ev = None
        if share.exists(share.evaluation(r)):
            try:
                ev = share.read_record(Evaluation, share.evaluation(r))
            except Exception:  # noqa: BLE001 - as above
                ev = None
        rows.append(RoundRow(
            round=r, closed_because=s.closed_because, seconds=s.seconds, accepted=len(s.accepted),
            rejected=len(s.rejected), train_loss=float(s.metrics.get("train_loss", float("nan"))),
            test_accuracy=float(ev.test_accuracy) if ev else None, test_loss=float(ev.test_loss) if ev else None,
            down_bytes=s.traffic.down_bytes if s.traffic else None, up_bytes=s.traffic.up_bytes if s.traffic else None,
            closed_at=s.closed_at, train_s={x.worker: x.train_s for x in s.accepted if x.train_s is not None},
            compute=dict(s.compute), epsilon=s.privacy.epsilon if s.privacy else None))
    return rows


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


COLUMNS = ("round", "test acc", "test loss", "train loss", "accepted", "rejected", "seconds", "MB down", "MB up",
           "training s by worker")


def columns(rows: list[RoundRow]) -> tuple[str, ...]:
    """COLUMNS, with epsilon before the last when the run spends a privacy budget (dp)."""
    return (*COLUMNS[:-1], "epsilon", COLUMNS[-1]) if any(x.epsilon is not None for x in rows) else COLUMNS


def table(rows: list[RoundRow]) -> list[list[str]]:
    """The rows as text cells, under columns(rows)."""
    private = any(x.epsilon is not None for x in rows)
    return [[str(x.round), _num(x.test_accuracy), _num(x.test_loss), _num(x.train_loss), str(x.accepted),
             str(x.rejected), f"{x.seconds:.2f}", _mb(x.down_bytes), _mb(x.up_bytes),
             *([_num(x.epsilon, 3)] if private else []),
             ", ".join(f"{w} {s:.2f}" for w, s in sorted(x.train_s.items()))] for x in rows]


def totals(rows: list[RoundRow]) -> str:
    """The run's training seconds by device kind (GPU-seconds for GPUs) and the bytes it moved."""
    kinds: dict[str, float] = {}
    for x in rows:
        for kind, seconds in x.compute.items():
            kinds[kind] = kinds.get(kind, 0.0) + seconds
    moved = sum((x.down_bytes or 0) + (x.up_bytes or 0) for x in rows)
    by_kind = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(kinds.items())) or "none recorded"
    return f"training time by device kind: {by_kind}; tensors moved through the share: {moved / 1e6:.1f} MB"


def format_table(rows: list[RoundRow]) -> str:
    heads = columns(rows)
    cells = [list(heads), *table(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(heads))]
    lines = ["  ".join(c.ljust(w) if i == len(heads) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    return "\n".join([*lines, totals(rows)])


def plot_png(rows: list[RoundRow], title: str) -> bytes:
    """Test accuracy, the losses, and each worker's training time per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)  # laid out by hand: the solver doubles the drawing's time
    acc, loss, times = fig.subplots(1, 3)
    evaluated = [x for x in rows if x.test_accuracy is not None]
    acc.plot([x.round for x in evaluated], [x.test_accuracy for x in evaluated], marker="o", color="tab:blue")
    acc.set(title="test accuracy", xlabel="round", ylim=(0, 1))
    acc.grid(alpha=0.3)
    loss.plot([x.round for x in evaluated], [x.test_loss for x in evaluated], marker="o", label="test")
    loss.plot([x.round for x in rows], [x.train_loss for x in rows], marker=".", label="train (workers' mean)")
    loss.set(title="loss", xlabel="round", yscale="log" if rows and min(x.train_loss for x in rows) > 0 else "linear")
    loss.legend()
    loss.grid(alpha=0.3)
    for worker in sorted({w for x in rows for w in x.train_s}):
        points = [(x.round, x.train_s[worker]) for x in rows if worker in x.train_s]
        times.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=worker)
    times.set(title="training time per round (s)", xlabel="round", ylim=(0, None))
    if any(x.train_s for x in rows):
        times.legend(fontsize="small")
    times.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.14, top=0.84, wspace=0.22)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def markdown(share: Share, manifest: Manifest, rows: list[RoundRow]) -> str:
    """report.md: the run, its curve, its latest decisions and the per-round table."""
    cfg = manifest.config
    lines = [f"# fedsync run {manifest.run_id}", "",
             f"{cfg['task']}/{cfg['model']}, aggregation {cfg['aggregation']}, started {manifest.created}. "
             "Written by the coordinator after each round; `fedsync results` prints the same table.", "",
             f"![test accuracy, losses and training time per round]({names.REPORT_PNG})", ""]
    if rows:
        last = share.read_record(Summary, share.summary(rows[-1].round))
        evaluated = [x for x in rows if x.test_accuracy is not None]
        best = f"; latest test accuracy {evaluated[-1].test_accuracy:.4f} (round {evaluated[-1].round})" \
            if evaluated else ""
        lines += [f"## Round {last.round}, the latest", "",
                  f"Closed by {last.closed_because} after {last.seconds:.2f} s{best}.", ""]
        lines += [f"- accepted {x.worker}: {x.samples} samples, {x.steps} steps, train loss {x.train_loss:.4f}"
                  for x in last.accepted]
        lines += [f"- rejected {x.worker} ({x.reason}): {x.detail}" for x in last.rejected]
        lines += [f"- missing {w}" for w in last.missing]
        lines += [f"- late {x.worker} for round {x.round}: {x.outcome} ({x.detail})" for x in last.late]
        if last.privacy is not None:
            p = last.privacy
            lines += ["", f"Differential privacy ({p.noise} noise, noise multiplier {p.noise_multiplier:.4g}, clip "
                          f"{p.clip:.4g}): epsilon {p.epsilon:.3f} spent through this round at delta {p.delta:g}."]
        lines += ["", "## Rounds", "", totals(rows) + ".", "", "| " + " | ".join(columns(rows)) + " |",
                  "|" + "---|" * len(columns(rows))]
        lines += ["| " + " | ".join(row) + " |" for row in table(rows)]
    else:
        lines += ["No round has closed yet."]
    return "\n".join(lines) + "\n"


MIN_GAP_S = 10.0  # between two refreshes; and at least 9x the last drawing's time: at most a tenth of a core
STOP_WAIT_S = 5.0  # an interrupted run waits this long, at most, for a drawing under way


class Reporter:
    """Refreshes report.md and report.png in a thread of its own at low priority, so drawing never holds up a round:
    after each round, but at most every MIN_GAP_S seconds (requests in between are folded into one), and once more
    when the run ends, so the report shows how it ended."""

    def __init__(self, share: Share, manifest: Manifest, log: Log) -> None:
        self.share, self.manifest, self.log = share, manifest, log  # fedsync.yaml is written once: read it once
        self.broken = False  # a drawing failure is said once: the run goes on without a report
        self.writes = RepeatedWrite(log, "the report", "after the next round")
        self.wanted = threading.Event()
        self.stopping = threading.Event()  # cuts a wait between refreshes short
        self.stopped = False
        self.abandoned = False  # stopping without another drawing
        self.ready_at = 0.0  # monotonic time before which no refresh starts (unless stopping)
        self.thread = threading.Thread(target=self._work, name="report", daemon=True)
        self.thread.start()

    def refresh(self) -> None:
        self.wanted.set()

    def close(self, draw: bool = True) -> None:
        """Draw what the share holds now, once more, and stop. `draw` False (Ctrl-C, SIGTERM): stop without another
        drawing, waiting at most STOP_WAIT_S for one under way: at low priority on a busy machine a drawing (the
        first imports matplotlib) takes tens of seconds, and a stop must be prompt; its writes are atomic, so
        leaving it loses nothing, and the next start draws again."""
        self.stopped, self.abandoned = True, not draw
        self.stopping.set()
        self.wanted.set()
        self.thread.join(timeout=60 if draw else STOP_WAIT_S)

    def _work(self) -> None:
        yield_cpu("the report thread", self.log)
        while True:
            self.wanted.wait()
            if self.abandoned:
                return
            self.stopping.wait(max(0.0, self.ready_at - time.monotonic()))
            self.wanted.clear()
            last = self.stopped  # read before drawing: a close() during this drawing asks for one more
            started = time.monotonic()
            try:
                self.writes.attempt(self._write)
            except Exception as e:  # noqa: BLE001 - a report that cannot be drawn must never stop the run
                if not self.broken:
                    self.log(f"WARNING: report.md/report.png not refreshed ({type(e).__name__}: {e})")
                self.broken = True
            self.ready_at = time.monotonic() + max(MIN_GAP_S, 9 * (time.monotonic() - started))
            if last:
                return

    def _write(self) -> None:
        rows = read_rows(self.share)
        self.share.write(names.REPORT_PNG, plot_png(rows, f"fedsync run {self.manifest.run_id}"))
        self.share.write(names.REPORT_MD, markdown(self.share, self.manifest, rows).encode())


METRICS_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "updates_accepted", "updates_rejected",
                   "seconds", "federated_accuracy", "federated_loss", "closed_at", "down_bytes", "up_bytes",
                   "train_s", "epsilon")


class Metrics:
    """metrics.csv, whole, from the rows known now: a round's row when it closes, its test columns when its
    evaluation lands (from the evaluation thread: one writer at a time)."""

    def __init__(self, share: Share, backoff: Backoff) -> None:
        self.share, self.backoff = share, backoff
        self.rows: dict[int, dict[str, object]] = {}
        self.lock = threading.Lock()

    def closed(self, s: Summary) -> None:
        """A round's row before its evaluation lands: the test columns stay empty until then. The federated
        columns measure the model the round started from, on the workers' held-out parts."""
        fed = s.federated
        with self.lock:
            self.rows[s.round] = {
                "round": s.round, "test_accuracy": "", "test_loss": "", "train_loss": f"{s.metrics['train_loss']:.6f}",
                "updates_accepted": len(s.accepted), "updates_rejected": len(s.rejected), "seconds": s.seconds,
                "federated_accuracy": f"{fed.accuracy:.6f}" if fed else "",
                "federated_loss": f"{fed.loss:.6f}" if fed else "", "closed_at": s.closed_at or "",
                "down_bytes": s.traffic.down_bytes if s.traffic else "",
                "up_bytes": s.traffic.up_bytes if s.traffic else "",
                "train_s": round(sum(s.compute.values()), 4) if s.traffic else "",
                "epsilon": f"{s.privacy.epsilon:.6f}" if s.privacy else ""}

    def evaluated(self, ev: Evaluation) -> None:
        with self.lock:
            self.rows[ev.round].update({"test_accuracy": f"{ev.test_accuracy:.6f}",
                                        "test_loss": f"{ev.test_loss:.6f}"})

    def tested(self) -> dict[int, tuple[float, float]]:
        """Each round whose evaluation has landed: (test accuracy, test loss)."""
        with self.lock:
            return {r: (float(row["test_accuracy"]), float(row["test_loss"]))  # type: ignore[arg-type]
                    for r, row in self.rows.items() if row["test_accuracy"] != ""}

    def write(self) -> None:
        with self.lock:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows[r] for r in sorted(self.rows))
            self.backoff.run(lambda: self.share.write(self.share.metrics, out.getvalue().encode()),
                             "writing metrics.csv")


def traffic(a: Assignment, accepted: list[Accepted], rejected: list[Rejected]) -> Traffic:
    """The round's model went down to every worker that answered (accepted or rejected); the accepted updates
    came up."""
    answered = {x.worker for x in accepted} | {x.worker for x in rejected}
    return Traffic(model_bytes=a.model.bytes, down_bytes=a.model.bytes * len(answered & set(a.workers)),
                   up_bytes=sum(x.bytes or 0 for x in accepted))


def compute(accepted: list[Accepted], device_names: dict[str, str]) -> dict[str, float]:
    """The accepted updates' training seconds by device kind (the worker's registered device name, else the device
    its marker names)."""
    seconds: dict[str, float] = {}
    for x in accepted:
        kind = device_names.get(x.worker, x.device)
        seconds[kind] = round(seconds.get(kind, 0.0) + (x.train_s or 0.0), 4)
    return seconds
