"""The coordinator: opens rounds, takes in updates as their markers appear, closes and aggregates.

Everything it knows comes from the share, so a restart with the same command picks the run up where the
files say it is. Read top to bottom: start or continue the run, then per round open, collect, close.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from filelock import Timeout

from .config import RunConfig
from .data import Dataset, load_dataset
from .errors import ConfigError, ShareError
from .faults import crash_point
from .fedavg import staleness_weight
from .intake import Aggregator, Candidate, Outcome
from .lease import LEASE_FILE, Lease
from .liveness import Liveness
from .logs import Log, make_log
from .manifest import open_run
from .markers import (
    FORMAT_VERSION,
    Accepted,
    Assignment,
    CoordinatorLease,
    FileRef,
    FinalMarker,
    FormatMismatch,
    Late,
    Manifest,
    MarkerError,
    PathOutsideFolder,
    Rejected,
    Summary,
    UpdateMarker,
    WorkerTask,
    parse,
    to_dict,
)
from .models import build_model
from .reasons import Reason
from .share import (
    Backoff,
    Share,
    atomic_write,
    is_conflict_copy,
    is_temporary,
    local_lock,
    read_yaml,
    remove_stale_temps,
    write_yaml,
)
from .syncthing import SyncthingNudge
from .tensorfile import Unusable, layout_of, load_verified, read_verified, save_state
from .train import evaluate
from .watch import ShareWatcher

COORDINATOR_ROOT_FILES = {"fedsync.yaml", "coordinator.yaml", "metrics.csv", "final.safetensors", "final.yaml"}
COORDINATOR_ROUND_FILES = {"global.safetensors", "assignment.yaml", "summary.yaml"}
METRICS_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "updates_accepted", "updates_rejected",
                   "seconds")


@dataclass
class CoordinatorOptions:
    share: Path
    config: RunConfig
    rounds: int = 20
    watch: str = "auto"
    rescan: float = 2.0          # seconds between full rescans when no event arrives
    created_by: str = "coordinator"
    syncthing: str | None = None   # URL of this machine's Syncthing API, to be nudged after each write
    syncthing_key: str | None = None
    log: Log = field(default_factory=lambda: make_log("coordinator"))


def quorum_target(quorum: int | float, live_assigned: int, min_updates: int) -> int:
    """Accepted updates needed to close early: a count, or a fraction of the live assigned workers."""
    wanted = min(quorum, live_assigned) if isinstance(quorum, int) else math.ceil(quorum * live_assigned)
    return max(min_updates, wanted)


def run_coordinator(opts: CoordinatorOptions) -> FinalMarker:
    share = Share(opts.share)
    if opts.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    lock = local_lock(share.root, "coordinator")
    try:
        lock.acquire()
    except Timeout:
        holder = _lease_holder(share)
        raise ShareError(f"another fedsync coordinator on this machine{holder} is already driving {share.root}; "
                         "stop it first") from None
    try:
        # a bad --syncthing is refused before anything in the share is touched
        nudge = SyncthingNudge(opts.syncthing, opts.syncthing_key, share.root, opts.log) if opts.syncthing else None
        manifest = open_run(share, opts.config, opts.created_by)
        lease = Lease(share, manifest.run_id, opts.config.heartbeat, opts.config.worker_timeout, opts.log)
        lease.acquire()
        finished = False
        try:
            dataset = load_dataset(opts.config.task, opts.config.data_root, opts.config.seed,
                                   opts.config.test_fraction, opts.config.verify_checksums)
            with ShareWatcher(share.root, opts.watch) as watcher:
                final = Coordinator(share, manifest, opts, dataset, watcher, lease, nudge).run()
                finished = True
                return final
        finally:
            lease.release("finished" if finished else "stopped")
    finally:
        lock.release()


def _lease_holder(share: Share) -> str:
    try:
        lease = parse(CoordinatorLease, read_yaml(share.root / LEASE_FILE), LEASE_FILE)
    except Exception:  # noqa: BLE001 - only decorates the message
        return ""
    return f" (pid {lease.pid})"


class Coordinator:
    def __init__(self, share: Share, manifest: Manifest, opts: CoordinatorOptions, dataset: Dataset,
                 watcher: ShareWatcher, lease: Lease, nudge: SyncthingNudge | None = None) -> None:
        self.share, self.manifest, self.opts, self.cfg = share, manifest, opts, opts.config
        self.dataset, self.watcher, self.lease, self.log = dataset, watcher, lease, opts.log
        self.nudge = nudge
        self.liveness = Liveness(share, self.cfg.worker_timeout)
        self.backoff = Backoff(self.log)
        self.model = build_model(self.cfg.model, dataset.num_classes, seed=self.cfg.seed)
        self.metrics: list[dict[str, object]] = []

    def run(self) -> FinalMarker:
        # Resume: the first round without a summary is the one to work on.
        closed = [r for r in self.share.rounds() if self.share.summary(r).exists()]
        if closed and closed[-1] > self.opts.rounds:
            raise ConfigError(f"the run in {self.share.root} already closed {closed[-1]} rounds: "
                              f"--rounds must be at least {closed[-1]}")
        self.metrics = [self._metrics_row(self._read_summary(r)) for r in closed]
        if closed:  # a crash may have left it a row short
            self.backoff.run(lambda: atomic_write(self.share.metrics, self._metrics_csv()), "writing metrics.csv")
        self._remove_stale_temps()
        r = (closed[-1] + 1) if closed else 1
        if r <= self.opts.rounds:
            self.share.final_marker.unlink(missing_ok=True)  # continuing a finished run: it is not finished
        self.log(f"run {self.manifest.run_id}: {self.cfg.task}/{self.cfg.model}, rounds {r}..{self.opts.rounds}, "
                 f"share {self.share.root}")
        self.log(f"watching the share by {self.watcher.describe}")
        while r <= self.opts.rounds:
            assignment, state = self.backoff.run(lambda: self._open_round(r), f"opening round {r}")
            self._collect_and_close(r, assignment, state)
            r += 1
        return self._finish()

    # -- opening -----------------------------------------------------------------------------------------

    def _open_round(self, r: int) -> tuple[Assignment, dict[str, torch.Tensor]]:
        """The round's assignment and global model: read back if already written, else written now."""
        if self.share.assignment(r).exists():
            a = parse(Assignment, read_yaml(self.share.assignment(r)), str(self.share.assignment(r)))
            return a, load_verified(self.share.global_model(r), a.model)
        if r == 1:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            model_ref = save_state(self.share.global_model(1), state)
        else:
            # The aggregate of round r-1 is this round's global model; after a run that had ended there it
            # sits in final.safetensors and is copied (verified) into place.
            previous = self._read_summary(r - 1)
            model_ref = FileRef("global.safetensors", previous.model.blake3, previous.model.bytes)
            source = self.share.root / previous.model.file
            if source != self.share.global_model(r):
                atomic_write(self.share.global_model(r), read_verified(source, previous.model))
            state = load_verified(self.share.global_model(r), model_ref)
        workers = self._wait_for_workers(r)
        a = Assignment(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=r, rounds=self.opts.rounds,
                       model=model_ref, num_shards=len(workers), time_budget_s=float(self.cfg.round_timeout),
                       workers={w: WorkerTask(shard=i, local_epochs=self.cfg.local_epochs)
                                for i, w in enumerate(workers)})
        self.share.updates_dir(r).mkdir(parents=True, exist_ok=True)
        write_yaml(self.share.assignment(r), to_dict(a))  # written last: the round is open from here on
        if self.nudge:
            self.nudge.scan(self.share.round_dir(r))
        self.log(f"round {r}/{self.opts.rounds} open: {len(workers)} worker(s) {', '.join(workers)}")
        return a, state

    def _wait(self, seconds: float) -> None:
        """Sleep until the share changes or `seconds` pass; stop if another coordinator took the share."""
        self.watcher.wait(seconds)
        if self.lease.lost.is_set():
            raise ShareError(f"another coordinator took over {self.share.root}; this one stopped")

    def _wait_for_workers(self, r: int) -> list[str]:
        announced = False
        self.lease.update("waiting for workers", r, f"{self.cfg.min_workers} live worker(s) needed")
        while True:
            for name in self.liveness.scan():
                info = self.liveness.info[name]
                self.log(f"worker {name} registered ({info.device}: {info.device_name}, torch {info.torch})")
            live = self.liveness.live()
            if len(live) >= self.cfg.min_workers:
                return live
            if not announced:
                self.log(f"waiting for {self.cfg.min_workers} live worker(s), {len(live)} so far")
                announced = True
            self._wait(self.opts.rescan)

    # -- collecting ----------------------------------------------------------------------------------------

    def _collect_and_close(self, r: int, a: Assignment, state: dict[str, torch.Tensor]) -> None:
        opened = time.monotonic()
        self.lease.update("collecting", r)
        intake = _RoundIntake(self.share, r, a, len(self.dataset.train))
        late = _LateIntake(self.share, r, self.cfg, len(self.dataset.train))
        aggregator = Aggregator(layout_of(state))
        reason = ""
        extended = False
        timings = {"final_intake_s": 0.0, "aggregate_s": 0.0, "evaluate_s": 0.0}
        try:
            while True:
                try:
                    self.liveness.scan()
                    candidates = intake.scan() + late.scan()
                except OSError as e:
                    self._wait(self.backoff.failed(e, f"looking for round {r}'s updates"))
                    continue
                if candidates:
                    t = time.perf_counter()
                    outcomes = aggregator.take(candidates)
                    intake.record([o for o in outcomes if o.candidate.round == r])
                    late.record([o for o in outcomes if o.candidate.round != r])
                    timings["final_intake_s"] = time.perf_counter() - t
                    if intake.accepted:
                        crash_point(f"coordinator:collecting:{r}")
                live_assigned = [w for w in a.workers if self.liveness.is_live(w)]
                target = quorum_target(self.cfg.quorum, len(live_assigned), self.cfg.min_updates)
                elapsed = time.monotonic() - opened
                enough = len(intake.accepted) >= self.cfg.min_updates
                if len(intake.accepted) >= target:
                    reason = "quorum"
                elif enough and intake.all_reported():
                    reason = "all_reported"
                elif elapsed >= a.time_budget_s and enough:
                    reason = "deadline"
                elif elapsed >= a.time_budget_s and not extended:
                    extended = True
                    note = (f"deadline passed with {len(intake.accepted)} accepted update(s), fewer than "
                            f"min_updates={self.cfg.min_updates}; the round stays open until enough arrive")
                    self.lease.update("extended", r, note)
                    self.log(f"round {r}: {note}")
                if reason:
                    break
                remaining = a.time_budget_s - elapsed
                self._wait(min(self.opts.rescan, remaining) if remaining > 0 else self.opts.rescan)
            t = time.perf_counter()
            new_state = aggregator.result(state)
            timings["aggregate_s"] = time.perf_counter() - t
        finally:
            aggregator.close()
        self._close(r, a, intake, late.records(), new_state, reason, time.monotonic() - opened, timings)

    # -- closing -------------------------------------------------------------------------------------------

    def _close(self, r: int, a: Assignment, intake: _RoundIntake, late: list[Late],
               new_state: dict[str, torch.Tensor], reason: str, seconds: float, timings: dict[str, float]) -> None:
        # 1. the aggregate, where the next round (or the end of the run) will look for it
        path = self.share.model_after(r, self.opts.rounds)
        name = path.relative_to(self.share.root).as_posix()
        ref = self.backoff.run(lambda: save_state(path, new_state, ref_name=name), f"writing {name}")
        # 2. its quality on the held-out set
        t = time.perf_counter()
        self.model.load_state_dict(new_state)
        test_loss, test_acc = evaluate(self.model, self.dataset.test, self.cfg.eval_batch_size)
        timings["evaluate_s"] = time.perf_counter() - t
        accepted = intake.accepted_records()
        total = sum(x.samples for x in accepted)
        train_loss = sum(x.train_loss * x.samples for x in accepted) / total
        # 3. the decision, written last: the round is closed from here on
        summary = Summary(format=FORMAT_VERSION, round=r, closed_because=reason, seconds=round(seconds, 3),
                          model=ref, accepted=accepted, rejected=intake.rejected_records(),
                          missing=intake.missing(), ignored=sorted(intake.ignored), late=late,
                          metrics={"test_accuracy": test_acc, "test_loss": test_loss, "train_loss": train_loss},
                          timings={k: round(v, 6) for k, v in timings.items()})
        self.backoff.run(lambda: write_yaml(self.share.summary(r), to_dict(summary)), f"writing round {r}'s summary")
        crash_point(f"coordinator:after-summary:{r}")
        if self.nudge:
            self.nudge.scan(self.share.summary(r))
        self.metrics.append(self._metrics_row(summary))
        self.backoff.run(lambda: atomic_write(self.share.metrics, self._metrics_csv()), "writing metrics.csv")
        self.log(f"round {r}/{self.opts.rounds} closed ({reason}): {len(accepted)} accepted, "
                 f"{len(summary.rejected)} rejected, {len(summary.missing)} missing; test accuracy {test_acc:.4f}, "
                 f"test loss {test_loss:.4f}, {seconds:.2f} s")
        for rej in summary.rejected:
            self.log(f"round {r}: rejected {rej.worker} ({rej.reason}): {rej.detail}")
        for x in late:
            self.log(f"round {r}: late update from {x.worker} for round {x.round} {x.outcome} ({x.detail})")

    def _finish(self) -> FinalMarker:
        last = self._read_summary(self.opts.rounds)
        final = FinalMarker(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=self.opts.rounds,
                            model=FileRef("final.safetensors", last.model.blake3, last.model.bytes),
                            test_accuracy=last.metrics["test_accuracy"])
        self.backoff.run(lambda: write_yaml(self.share.final_marker, to_dict(final)), "writing final.yaml")
        self.log(f"run {self.manifest.run_id} finished after {final.round} rounds: test accuracy "
                 f"{final.test_accuracy:.4f}; model in {self.share.final_model}")
        return final

    def _remove_stale_temps(self) -> None:
        """Temporary files of the coordinator's own files, left by a crash; readers skip them anyway."""
        removed = remove_stale_temps(self.share.root, COORDINATOR_ROOT_FILES)
        for r in self.share.rounds():
            removed += remove_stale_temps(self.share.round_dir(r), COORDINATOR_ROUND_FILES)
        if removed:
            self.log(f"removed {removed} temporary file(s) left by an interrupted coordinator")

    def _read_summary(self, r: int) -> Summary:
        return _load_summary(self.share, r)

    @staticmethod
    def _metrics_row(s: Summary) -> dict[str, object]:
        return {"round": s.round, "test_accuracy": f"{s.metrics['test_accuracy']:.6f}",
                "test_loss": f"{s.metrics['test_loss']:.6f}", "train_loss": f"{s.metrics['train_loss']:.6f}",
                "updates_accepted": len(s.accepted), "updates_rejected": len(s.rejected), "seconds": s.seconds}

    def _metrics_csv(self) -> bytes:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.metrics)
        return out.getvalue().encode()


class _RoundIntake:
    """The bookkeeping of one round's updates: which markers were seen, accepted, rejected or still pending."""

    def __init__(self, share: Share, r: int, a: Assignment, train_size: int) -> None:
        self.share, self.r, self.a, self.train_size = share, r, a, train_size
        self.accepted: dict[str, UpdateMarker] = {}
        self.rejected: dict[str, Rejected] = {}
        self.pending: dict[str, tuple[tuple[object, ...], Unusable]] = {}
        self.ignored: set[str] = set()
        self.markers: dict[str, UpdateMarker] = {}  # checked markers whose tensors are being verified
        self.signatures: dict[str, tuple[object, ...]] = {}  # files' state when last looked at, before reading
        self.duplicates: dict[str, Rejected] = {}
        self.settled: set[str] = set()  # decided in an earlier life of this round (late intake): skipped

    def scan(self) -> list[Candidate]:
        """Markers not decided yet whose files changed since last look, checked up to their tensor file."""
        candidates: list[Candidate] = []
        self._note_strays()
        try:
            names = os.listdir(self.share.updates_dir(self.r))
        except FileNotFoundError:
            return candidates
        for name in sorted(names):
            if is_temporary(name):
                continue
            if is_conflict_copy(name) or not (name.endswith(".yaml") or name.endswith(".safetensors")):
                self.ignored.add(f"updates/{name}")
                continue
            if name.endswith(".safetensors"):
                continue  # read through its marker
            worker = name[:-len(".yaml")]
            if worker in self.settled:
                continue
            signature = self._signature(worker)
            if worker in self.accepted or worker in self.rejected:
                if signature != self.signatures[worker] and worker not in self.duplicates:
                    self.duplicates[worker] = Rejected(worker, f"updates/{name}", Reason.DUPLICATE.value,
                                                       "its files changed after the update was decided")
                continue
            if worker in self.pending and self.pending[worker][0] == signature:
                continue
            self.signatures[worker] = signature  # taken before reading: a change during the read is retried
            try:
                candidates.append(self._check_marker(worker))
            except Unusable as problem:
                self._settle(worker, problem, signature)
        return candidates

    def _note_strays(self) -> None:
        """Anything in the round folder that the protocol does not put there is reported, never read."""
        expected = {"global.safetensors", "assignment.yaml", "updates", "summary.yaml"}
        for name in os.listdir(self.share.round_dir(self.r)):
            if name not in expected and not is_temporary(name):
                self.ignored.add(name)

    def _signature(self, worker: str) -> tuple[object, ...]:
        out: list[object] = []
        for path in (self.share.update_marker(self.r, worker), self.share.update_tensors(self.r, worker)):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _check_marker(self, worker: str) -> Candidate:
        path = self.share.update_marker(self.r, worker)
        if path.is_symlink():
            raise Unusable(Reason.BAD_PATH, f"{path.name} is a symbolic link")
        try:
            data = read_yaml(path)
        except Exception as e:  # noqa: BLE001 - OSError, YAMLError, OversizeError: all 'unreadable'
            raise Unusable(Reason.MARKER_UNREADABLE, f"{path.name}: {e}") from None
        try:
            m = parse(UpdateMarker, data, path.name)
        except FormatMismatch as e:
            raise Unusable(Reason.FORMAT_MISMATCH, str(e)) from None
        except PathOutsideFolder as e:
            raise Unusable(Reason.BAD_PATH, str(e)) from None
        except MarkerError as e:
            raise Unusable(Reason.MARKER_INVALID, str(e)) from None
        if worker not in self.a.workers:
            raise Unusable(Reason.NOT_ASSIGNED, f"{worker} has no task in round {self.r}")
        if m.worker != worker:
            raise Unusable(Reason.WRONG_WORKER, f"{path.name} says it is from {m.worker!r}")
        if m.round != self.r:
            raise Unusable(Reason.WRONG_ROUND, f"{path.name} is for round {m.round}, found in round {self.r}")
        if m.base != self.a.model.blake3:
            raise Unusable(Reason.WRONG_BASE, f"{path.name} was trained from model {m.base[:12]}…")
        if m.tensors.file != f"{worker}.safetensors":
            raise Unusable(Reason.BAD_PATH, f"{path.name} names {m.tensors.file!r}")
        if not 0 < m.samples <= self.train_size:
            raise Unusable(Reason.BAD_SAMPLES, f"samples={m.samples}, the training set has {self.train_size}")
        self.markers[worker] = m
        return Candidate(worker, self.share.update_tensors(self.r, worker), m.tensors, float(m.samples), self.r)

    def record(self, outcomes: list[Outcome]) -> None:
        """Apply the intake's verdicts; a later verdict on the same worker (a lane rebuild) overrides."""
        for o in outcomes:
            worker = o.candidate.worker
            if o.problem is None:
                self.accepted[worker] = self.markers[worker]
                self.pending.pop(worker, None)
            else:
                self.accepted.pop(worker, None)
                self._settle(worker, o.problem, self.signatures[worker])

    def _settle(self, worker: str, problem: Unusable, signature: tuple[object, ...]) -> None:
        if problem.reason.may_still_sync:
            self.pending[worker] = (signature, problem)  # retried when the files change, rejected at the close
        else:
            self.pending.pop(worker, None)
            self.rejected[worker] = Rejected(worker, f"updates/{worker}.yaml", problem.reason.value, problem.detail)

    def all_reported(self) -> bool:
        return all(w in self.accepted or w in self.rejected for w in self.a.workers)

    def accepted_records(self) -> list[Accepted]:
        return [Accepted(worker=w, samples=m.samples, weight=float(m.samples), train_loss=m.train_loss,
                         seconds=m.seconds, device=m.device) for w, m in sorted(self.accepted.items())]

    def rejected_records(self) -> list[Rejected]:
        late = [Rejected(w, f"updates/{w}.yaml", p.reason.value, f"still at the close: {p.detail}")
                for w, (_, p) in sorted(self.pending.items())]
        return sorted([*self.rejected.values(), *self.duplicates.values()], key=lambda x: x.worker) + late

    def missing(self) -> list[str]:
        reported = set(self.accepted) | set(self.rejected) | set(self.pending)
        return sorted(set(self.a.workers) - reported)


class _LateIntake:
    """Updates for closed rounds (at most max_staleness back) that arrived after their round closed."""

    def __init__(self, share: Share, r: int, cfg: RunConfig, train_size: int) -> None:
        self.r, self.cfg = r, cfg
        self.rounds: dict[int, _RoundIntake] = {}
        self.found: dict[tuple[int, str], Late] = {}
        window = range(max(1, r - cfg.max_staleness), r)
        summaries = {c: _load_summary(share, c) for c in window if share.summary(c).exists()}
        for c, s in summaries.items():
            a = parse(Assignment, read_yaml(share.assignment(c)), str(share.assignment(c)))
            ri = _RoundIntake(share, c, a, train_size)
            ri.settled = {x.worker for x in s.accepted} | {x.worker for x in s.rejected}
            self.rounds[c] = ri
        for s in summaries.values():  # recorded as late by an earlier round: decided, never again
            for x in s.late:
                if x.round in self.rounds:
                    self.rounds[x.round].settled.add(x.worker)

    def scan(self) -> list[Candidate]:
        """Late updates to read (fold), after recording those dropped or rejected by their markers."""
        out: list[Candidate] = []
        for c, ri in self.rounds.items():
            for cand in ri.scan():
                if self.cfg.late_policy == "drop":
                    self._decide(ri, Late(cand.worker, c, "dropped", 0.0, "late_policy is drop"))
                else:
                    weight = staleness_weight(cand.weight, self.r - c, self.cfg.staleness_exponent)
                    out.append(replace(cand, weight=weight))
            for w, rej in list(ri.rejected.items()):
                self._decide(ri, Late(w, c, "rejected", 0.0, f"{rej.reason}: {rej.detail}"))
                del ri.rejected[w]
        return out

    def record(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            c, ri = o.candidate.round, self.rounds[o.candidate.round]
            if o.problem is None:
                self._decide(ri, Late(o.candidate.worker, c, "folded", round(o.candidate.weight, 6),
                                      f"{self.r - c} round(s) late"))
            elif o.problem.reason.may_still_sync:
                self.found.pop((c, o.candidate.worker), None)  # retried, in this round or the next
                ri.settled.discard(o.candidate.worker)
                ri.pending[o.candidate.worker] = (ri.signatures[o.candidate.worker], o.problem)
            else:
                self._decide(ri, Late(o.candidate.worker, c, "rejected", 0.0,
                                      f"{o.problem.reason.value}: {o.problem.detail}"))

    def _decide(self, ri: _RoundIntake, late: Late) -> None:
        self.found[(late.round, late.worker)] = late
        ri.settled.add(late.worker)

    def records(self) -> list[Late]:
        return [self.found[k] for k in sorted(self.found)]


def _load_summary(share: Share, r: int) -> Summary:
    return parse(Summary, read_yaml(share.summary(r)), str(share.summary(r)))
