"""The coordinator: opens rounds, takes in updates as their markers appear, closes and aggregates.

Everything it knows comes from the share, so a restart with the same command picks the run up where the
files say it is. Read top to bottom: start or continue the run, then per round open, collect, close.
"""

from __future__ import annotations

import csv
import io
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from filelock import Timeout

from fedsync.aggregation.intake import Aggregator, Outcome
from fedsync.aggregation.optimizers import make_optimizer
from fedsync.aggregation.rules import make_rule
from fedsync.aggregation.screening import outliers
from fedsync.aggregation.tensors import layout_of, load_verified, save_state, state_bytes
from fedsync.base.clock import utc_stamp
from fedsync.base.errors import ConfigError, RunStuck, ShareError
from fedsync.base.faults import crash_point
from fedsync.base.logs import Log, Logger, make_log
from fedsync.fedavg import l2_norm
from fedsync.learning.balance import plan_steps
from fedsync.learning.data import Dataset, Source
from fedsync.learning.device import DeviceChoice, DeviceFacts, choose_device
from fedsync.learning.partition import hold_out, partition
from fedsync.run.config import RunConfig, load_data
from fedsync.run.evaluation import Evaluator, due, federated_mean
from fedsync.run.ledger import LateLedger, RoundLedger, load_summary
from fedsync.run.liveness import Liveness
from fedsync.run.report import Reporter
from fedsync.run.start import check_run, task_record
from fedsync.run.trust import Trust, check_coordinator_key
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import Identity, coordinator_key_path, load_identity
from fedsync.storage.lease import Lease, read_lease
from fedsync.storage.locks import local_lock
from fedsync.storage.manifest import new_manifest, write_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Accepted,
    Assignment,
    Evaluation,
    FileRef,
    FinalMarker,
    Late,
    Manifest,
    MarkerError,
    Rejected,
    Summary,
    Traffic,
    WorkerTask,
    to_dict,
)
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, final_message, verify
from fedsync.storage.syncthing import SyncthingNudge
from fedsync.storage.trouble import Backoff
from fedsync.storage.watch import ShareWatcher

METRICS_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "updates_accepted", "updates_rejected",
                   "seconds", "federated_accuracy", "federated_loss", "closed_at", "down_bytes", "up_bytes",
                   "train_s")


@dataclass
class CoordinatorOptions:
    share: Path
    config: RunConfig
    rounds: int = 20
    watch: str = "auto"
    rescan: float = 2.0          # seconds between full rescans when no event arrives
    created_by: str = "coordinator"
    data_root: str | None = None   # where the task's test data is on this machine; None: the config's data_root
    syncthing: str | None = None   # URL of this machine's Syncthing API, to be nudged after each write
    syncthing_key: str | None = None
    key: Path | None = None        # this coordinator's private key; None: coordinator.pem in the key folder
    device: str = "auto"           # where it evaluates: auto | cpu | cuda | cuda:N | mps
    log: Log = field(default_factory=lambda: make_log("coordinator"))


SCAN_SHARE = 0.5  # the most of a collecting coordinator's time that rescanning the share may take


def quorum_target(quorum: int | float, live_assigned: int, min_updates: int) -> int:
    """Accepted updates needed to close early: a count, or a fraction of the live assigned workers."""
    wanted = min(quorum, live_assigned) if isinstance(quorum, int) else math.ceil(quorum * live_assigned)
    return max(min_updates, wanted)


def run_coordinator(opts: CoordinatorOptions) -> FinalMarker:
    share = Share(opts.share)
    if opts.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    lock = local_lock(share.identity, "coordinator")
    try:
        lock.acquire()
    except Timeout:
        holder = _lease_holder(share)
        raise ShareError(f"another fedsync coordinator on this machine{holder} is already driving {share.where()}; "
                         "stop it first") from None
    try:
        # Every check that can refuse the start runs before the first write, so a refused or failed start
        # leaves the share byte for byte as it was (PROTOCOL.md section 6, step 1).
        nudge = SyncthingNudge(opts.syncthing, opts.syncthing_key, share.root, opts.log) if opts.syncthing else None
        existing = check_run(share, opts.config)
        choice = choose_device(opts.device, DeviceFacts.probe())  # an explicit device that is absent fails here
        identity, created = load_identity(opts.key or coordinator_key_path())
        if existing is not None:
            check_coordinator_key(share, existing, identity)
        closed = share.closed_rounds()
        if closed and closed[-1] > opts.rounds:
            raise ConfigError(f"the run in {share.where()} already closed {closed[-1]} rounds: "
                              f"--rounds must be at least {closed[-1]}")
        dataset, test = load_data(opts.config, opts.data_root or opts.config.data_root, opts.log)
        manifest = existing or new_manifest(opts.config.as_dict(), opts.created_by, identity.public,
                                            task_record(opts.config))
        lease = Lease(share, manifest.run_id, opts.config.heartbeat, opts.config.worker_timeout, opts.log)
        lease.check()
        if existing is None:
            write_manifest(share, manifest)
        lease.acquire()
        opts.log(f"coordinator key {identity.path}{' (created now)' if created else ''}: fingerprint "
                 f"{identity.fingerprint}; workers pin it at first contact (or pass --coordinator-key "
                 f"{identity.public})")
        finished = False
        try:
            with ShareWatcher(share, opts.watch, list_store=False) as watcher:
                final = Coordinator(share, manifest, opts, dataset, test, watcher, lease, identity, choice,
                                    nudge).run()
                finished = True
                return final
        finally:
            lease.release("finished" if finished else "stopped")
    finally:
        lock.release()


def _lease_holder(share: Share) -> str:
    lease = read_lease(share)
    return f" (pid {lease.pid})" if lease else ""


class Coordinator:
    def __init__(self, share: Share, manifest: Manifest, opts: CoordinatorOptions, dataset: Dataset | None,
                 test: Source, watcher: ShareWatcher, lease: Lease, identity: Identity, device: DeviceChoice,
                 nudge: SyncthingNudge | None = None) -> None:
        self.share, self.manifest, self.opts, self.cfg = share, manifest, opts, opts.config
        self.dataset, self.watcher, self.lease, self.log = dataset, watcher, lease, opts.log
        self.task = self.cfg.resolved_task()
        self.train_size = len(dataset.train) if dataset is not None else 0  # a private task's data is the workers'
        self.pruned = 0  # rounds up to this one have had their tensors removed by this process (keep_rounds)
        self.unequipped: set[str] = set()  # workers of a private task that registered no data of their own: said
        self.identity, self.nudge = identity, nudge
        self.liveness = Liveness(share, self.cfg.worker_timeout)
        self.trust = Trust(share, manifest.run_id, identity, self.cfg.trust, self.liveness.public_key, self.log)
        self.backoff = Backoff(self.log)
        self.model = self.task.build_model(self.cfg.model, seed=self.cfg.seed)
        self.parameters = frozenset(name for name, _ in self.model.named_parameters())
        self.rule = make_rule(self.cfg.aggregation, self.cfg.momentum, self.cfg.trim)
        self.optimizer = make_optimizer(self.cfg.server_settings(), self.parameters)
        self.server_state: dict[str, torch.Tensor] = {}  # the optimizer's, after the last closed round; none: stateless
        self.cuts: dict[int, tuple[list[np.ndarray], FileRef]] = {}  # by shard count: the shards and their list
        self.carried: tuple[str, dict[str, torch.Tensor]] | None = None  # the aggregate just written: its hash, state
        self.rows: dict[int, dict[str, object]] = {}  # metrics.csv by round: the summary's, then its evaluation's
        self.rows_lock = threading.Lock()  # the evaluation thread writes metrics.csv too
        if device.fallback:
            self.log(f"WARNING: evaluating on the CPU although a GPU is present: {device.fallback}")
        self.reporter = Reporter(share, manifest, self.log)
        self.evaluator = Evaluator(share, self.task, self.cfg, test, device.device, self.log,
                                   self._landed)

    def run(self) -> FinalMarker:
        try:
            return self._run()
        finally:
            self.evaluator.close()
            self.reporter.close()  # drawn once more: the report shows the run as it ends

    def _run(self) -> FinalMarker:
        # Resume: the first round without a summary is the one to work on.
        closed = self.share.closed_rounds()
        self._remove_stale_temps()
        unevaluated = []
        for r in closed:
            summary = load_summary(self.share, r)
            self.rows[r] = self._metrics_row(summary)
            if self.share.exists(self.share.evaluation(r)):
                self.rows[r].update(self._evaluation_row(self.share.read_record(Evaluation, self.share.evaluation(r))))
            elif due(r, self.opts.rounds, self.cfg.eval_every):  # its evaluation was cut short: done now
                unevaluated.append((r, summary.model))
        if closed:  # a crash may have left it a row short
            self.server_state = self._server_state(load_summary(self.share, closed[-1]))
            self._write_metrics()
            self._prune(closed[-1])  # a crash may have come between a summary and its pruning
        for r, model in unevaluated:
            if self.share.exists(model.file):
                self.evaluator.submit(r, model)
            else:
                self.log(f"round {r}: its model was pruned (keep_rounds) before it was evaluated; not evaluated")
        r = (closed[-1] + 1) if closed else 1
        if r <= self.opts.rounds:
            self.share.remove(self.share.final_marker)  # continuing a finished run: it is not finished
        self.log(f"run {self.manifest.run_id}: {self.cfg.task}/{self.cfg.model}, rounds {r}..{self.opts.rounds}, "
                 f"share {self.share.where()}")
        self.log(f"watching the share by {self.watcher.describe}")
        while r <= self.opts.rounds:
            # Unusable too: its own files vanish for a moment when the share's mount drops between two reads
            assignment, state = self.backoff.run(lambda: self._open_round(r), f"opening round {r}",
                                                 retry=(OSError, Unusable))
            self._collect_and_close(r, assignment, state)
            r += 1
        return self._finish()

    # -- opening -----------------------------------------------------------------------------------------

    def _open_round(self, r: int) -> tuple[Assignment, dict[str, torch.Tensor]]:
        """The round's assignment and global model: read back if already written, else written now."""
        if self.share.exists(self.share.assignment(r)):
            a = self._own_assignment(r)
            if a is not None:
                return a, load_verified(self.share, self.share.global_model(r), a.model)
        if r == 1:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            model_ref = save_state(self.share.write, self.share.global_model(1), state)
        else:
            # The aggregate of round r-1 is this round's global model; after a run that had ended there it
            # sits in final.safetensors and is copied (verified) into place.
            previous = load_summary(self.share, r - 1)
            model_ref = FileRef(names.GLOBAL_MODEL, previous.model.blake3, previous.model.bytes)
            if previous.model.file != self.share.global_model(r):
                data = self.share.read_verified(previous.model.file, previous.model)
                self.share.write(self.share.global_model(r), data)
            if self.carried is not None and self.carried[0] == model_ref.blake3:
                state = self.carried[1]  # written by this process a moment ago: not read back
            else:
                state = load_verified(self.share, self.share.global_model(r), model_ref)
            self.carried = None
        workers = self._wait_for_workers(r)
        shards, shard_list = self._cut(len(workers)) if self.dataset is not None else ([], None)
        a = Assignment(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=r, rounds=self.opts.rounds,
                       model=model_ref, num_shards=len(shards), time_budget_s=float(self.cfg.round_timeout),
                       workers=self._tasks(r, workers, shards), shards=shard_list)
        a.signature = self.identity.sign(assignment_message(a))
        self.share.make_folder(self.share.updates_dir(r))
        self.share.write_yaml(self.share.assignment(r), to_dict(a))  # last: the round is open from here on
        if self.nudge:
            self.nudge.scan(self.share.round_dir(r))
        self.log(f"round {r}/{self.opts.rounds} open: {len(workers)} worker(s) {', '.join(workers)}")
        return a, state

    def _own_assignment(self, r: int) -> Assignment | None:
        """Round r's assignment if this coordinator wrote it (a restart); None, said, when someone else did: the round
        is opened again over it, and workers never trained on it (they check the signature)."""
        try:
            a = self.share.read_record(Assignment, self.share.assignment(r))
            if verify(self.identity.public, assignment_message(a), a.signature):
                return a
            why = "it is not signed by this coordinator"
        except MarkerError as e:
            why = str(e)
        self.log(f"round {r}: WARNING: {self.share.where(self.share.assignment(r))} was not written by this "
                 f"coordinator ({why}): opening the round over it")
        return None

    def _cut(self, num_shards: int) -> tuple[list[np.ndarray], FileRef]:
        """The training set cut `num_shards` ways (positions in this machine's training split), and its list
        shards/NNN.safetensors, written when absent or not what it should be: each shard's examples by their index
        in the task's whole data (PROTOCOL.md 5.4), so a worker needs no random generator to find them. Once per
        shard count and process: the cut follows from the config alone."""
        if num_shards not in self.cuts:
            dataset = self.dataset
            assert dataset is not None  # a shared task's coordinator holds its data
            shards = partition(dataset.train.y.numpy(), num_shards, self.cfg.partition, self.cfg.seed,
                               self.cfg.dirichlet_alpha)
            canonical = dataset.canonical()
            data = state_bytes({str(i): torch.as_tensor(canonical[part], dtype=torch.int64)
                                for i, part in enumerate(shards)})
            name = names.shard_list(num_shards)
            ref = FileRef(name, hash_bytes(data), len(data))
            try:
                self.share.read_verified(name, ref)
            except Unusable:  # absent, or not this list: written (again) now
                self.share.make_folder(names.SHARDS)
                self.share.write(name, data)
            self.cuts[num_shards] = (shards, ref)
        return self.cuts[num_shards]

    def _tasks(self, r: int, workers: list[str], shards: list[np.ndarray]) -> dict[str, WorkerTask]:
        """Shard i to the i-th worker, or for a private task each worker's own data (its registered sample count
        bounds what it may claim); with balance: throughput, steps sized by each worker's published speed."""
        if self.task.private:
            owned = {w: self.liveness.info[w].own_samples or 0 for w in workers}
            equal = {w: WorkerTask(shard=None, local_epochs=self.cfg.local_epochs, samples=owned[w],
                                   local_steps=self.cfg.local_steps) for w in workers}
            sizes = {w: np.arange(owned[w]) for w in workers}
        else:
            equal = {w: WorkerTask(shard=i, local_epochs=self.cfg.local_epochs, local_steps=self.cfg.local_steps)
                     for i, w in enumerate(workers)}
            sizes = {w: shards[i] for i, w in enumerate(workers)}
        if self.cfg.balance != "throughput":
            return equal
        speeds = {w: self.liveness.info[w].samples_per_s for w in workers}
        unknown = sorted(w for w, s in speeds.items() if not s)
        if unknown:
            self.log(f"round {r}: equal work: no measured speed from {', '.join(unknown)} yet")
            return equal
        trained = {w: len(hold_out(rows, self.cfg.federated_eval)[0]) for w, rows in sizes.items()}
        steps = plan_steps(trained, speeds,  # type: ignore[arg-type]
                           self.cfg.local_epochs, self.cfg.batch_size, self.cfg.round_timeout, self.cfg.local_steps)
        self.log(f"round {r}: steps by throughput: " + ", ".join(
            f"{w} {steps[w]} ({speeds[w]:.0f} samples/s)" for w in workers))
        return {w: replace(t, local_steps=steps[w]) for w, t in equal.items()}

    def _wait(self, seconds: float) -> None:
        """Sleep until the share changes or `seconds` pass; stop if another coordinator took the share."""
        self.watcher.wait(seconds)
        if self.lease.lost.is_set():
            raise ShareError(f"another coordinator took over {self.share.where()}; this one stopped")

    def _wait_for_workers(self, r: int) -> list[str]:
        announced = False
        self.lease.update("waiting for workers", r, f"{self.cfg.min_workers} live worker(s) needed")
        while True:
            for name in self.liveness.scan():
                info = self.liveness.info[name]
                self.log(f"worker {name} registered ({info.device}: {info.device_name}, {info.precision}, "
                         f"torch {info.torch})")
                if info.device_fallback:
                    self.log(f"WARNING: worker {name} trains on the CPU although it has a GPU: "
                             f"{info.device_fallback}")
            self.trust.refresh()
            live = [w for w in self.trust.admit_all(self.liveness.live()) if self._equipped(w)]
            if len(live) >= self.cfg.min_workers:
                return live
            if not announced:
                self.log(f"waiting for {self.cfg.min_workers} live worker(s), {len(live)} so far")
                announced = True
            self._wait(self.opts.rescan)

    def _prune(self, last_closed: int) -> None:
        """keep_rounds: remove the tensors (global model, updates) of rounds more than keep_rounds closed rounds back;
        their markers, summaries and evaluations stay (PROTOCOL.md section 5.11). A round's aggregate is the next
        round's global model, so it goes one round later. Idempotent: a restart finishes what a crash cut short."""
        keep = self.cfg.keep_rounds
        if keep is None:
            return
        for p in self.share.rounds():
            if p > last_closed - keep:
                break
            if p <= self.pruned:
                continue
            updates = self.share.updates_dir(p)
            for e in self.share.list(updates):
                if e.name.endswith(names.TENSORS_SUFFIX):
                    self.share.remove(names.join(updates, e.name))
            self.share.remove(self.share.global_model(p))
            # never the last closed round's optimizer state, which the run goes on from: keep_rounds >= 2
            self.share.remove(self.share.server_state(p))
            self.pruned = p

    def _server_state(self, summary: Summary) -> dict[str, torch.Tensor]:
        """The optimizer's state after a closed round, read back (verified) to go on exactly from it."""
        if not self.optimizer.stateful:
            return {}
        if summary.server_state is None:
            raise ShareError(f"round {summary.round}'s summary names no {names.SERVER_STATE}, but the run's "
                             f"server_optimizer {self.optimizer.name} keeps state: the share was edited")
        try:
            return load_verified(self.share, self.share.server_state(summary.round), summary.server_state)
        except Unusable as e:
            raise ShareError(f"{self.share.where(self.share.server_state(summary.round))} cannot be used ({e.detail}); "
                             "the run cannot continue exactly without it") from None

    def _equipped(self, worker: str) -> bool:
        """Whether the worker can train: for a private task, it registered data of its own (said once if not)."""
        if not self.task.private or self.liveness.info[worker].own_samples:
            return True
        if worker not in self.unequipped:
            self.unequipped.add(worker)
            self.log(f"WARNING: worker {worker} registered no data of its own; task {self.cfg.task} trains on each "
                     "worker's own folder (fedsync worker --data DIR): it gets no work")
        return False

    # -- collecting ----------------------------------------------------------------------------------------

    def _collect_and_close(self, r: int, a: Assignment, state: dict[str, torch.Tensor]) -> None:
        opened = time.monotonic()
        self.lease.update("collecting", r)
        intake = RoundLedger(self.share, r, a, self.train_size, self.rule, self.trust)
        late = self.backoff.run(lambda: LateLedger(self.share, r, self.cfg, self.train_size, self.rule,
                                                   self.trust),
                                f"reading the rounds before round {r}")
        aggregator = Aggregator(layout_of(state), self.share.store, round=r)
        model_norm = l2_norm(state)
        reason = ""
        extended = False
        reported: set[str] = set()
        timings = {"final_intake_s": 0.0, "aggregate_s": 0.0, "evaluate_s": 0.0}
        try:
            while True:
                scan_started = time.monotonic()
                try:
                    self.liveness.scan()
                    self.trust.admit_all(self.liveness.live())  # a changed or unapproved key is said when it appears
                    if self.trust.refresh():  # a key approved: updates waiting on it are judged again
                        intake.recheck()
                        late.recheck()
                    candidates = intake.scan() + late.scan()
                    scan_s = time.monotonic() - scan_started
                except OSError as e:
                    self._wait(self.backoff.failed(e, f"looking for round {r}'s updates"))
                    continue
                if candidates:
                    t = time.perf_counter()
                    self._record(r, aggregator.take(candidates), intake, late)
                    self._screen(r, aggregator, model_norm, intake, late)
                    if self.cfg.clip_norm > 0:
                        self._record(r, aggregator.clip(self.cfg.clip_norm), intake, late)
                    timings["final_intake_s"] = time.perf_counter() - t
                    if intake.accepted:
                        crash_point(f"coordinator:collecting:{r}")
                self._report_rejections(r, intake, reported)
                self.evaluator.check()
                live = set(self.liveness.live())
                live_assigned = [w for w in a.workers if w in live]
                target = quorum_target(self.cfg.quorum, len(live_assigned), self.cfg.min_updates)
                self.lease.progress(sorted(intake.accepted), target)
                elapsed = time.monotonic() - opened
                self._show_progress(r, intake, target, a.time_budget_s - elapsed)
                enough = len(intake.accepted) >= self.cfg.min_updates
                if len(intake.accepted) >= target:
                    reason = "quorum"
                elif enough and intake.all_reported():
                    reason = "all_reported"
                elif elapsed >= a.time_budget_s and enough:
                    reason = "deadline"
                elif live_assigned and all(w in intake.rejected for w in live_assigned):
                    raise RunStuck(self._stuck(r, intake, live_assigned))
                elif elapsed >= a.time_budget_s and not extended:
                    extended = True
                    note = (f"deadline passed with {len(intake.accepted)} accepted update(s), fewer than "
                            f"min_updates={self.cfg.min_updates}; the round stays open until enough arrive")
                    self.lease.update("extended", r, note, intake.rejected_records())
                    self.log(f"round {r}: {note}")
                if reason:
                    t = time.perf_counter()
                    result = self.rule.aggregate(aggregator.collected(self.parameters))
                    on_time = None  # late updates move the model once; the optimizer's state learns without them
                    if self.optimizer.stateful and aggregator.has_late:
                        on_time = self.rule.aggregate(aggregator.collected(self.parameters, late=False)).delta
                    new_state, server_state = self.optimizer.step(state, result.delta, self.server_state, on_time)
                    timings["aggregate_s"] = time.perf_counter() - t
                    if all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):
                        break
                    self._take_out_largest(r, aggregator, intake, late)
                    reason = ""
                    continue  # the closing rules again, without it
                remaining = a.time_budget_s - elapsed
                self._wait(min(self.opts.rescan, remaining) if remaining > 0 else self.opts.rescan)
                # A scan lists workers/ and updates/ whole, and files arrive one event at a time: paced, a round
                # of N workers costs O(N) scans' worth of time in all, not N scans of N files.
                time.sleep(max(0.0, scan_started + scan_s / SCAN_SHARE - time.monotonic()))
            norms = {c.worker: n for c, n in aggregator.norms.items() if c.round == r}
            clipped = {c.worker for c in aggregator.scales if c.round == r}
        finally:
            aggregator.close()
        self._show_progress(r, intake, 0, 0.0)
        self._report_rejections(r, intake, reported, closing=True)
        if clipped:
            self.log(f"round {r}: clipped to L2 norm {self.cfg.clip_norm:g}: " + ", ".join(
                f"{w} ({norms[w]:.4g})" for w in sorted(clipped)))
        self._close(r, a, intake.accepted_records(norms, clipped), intake, late.records(), new_state, server_state,
                    reason, time.monotonic() - opened, timings, result.step_scale)

    def _show_progress(self, r: int, intake: RoundLedger, target: int, remaining: float) -> None:
        """On a terminal, the open round's updates against the quorum in one line (gone once it closes: target 0)."""
        if isinstance(self.log, Logger):
            self.log.progress(f"round {r}: {len(intake.accepted)} of {target} updates accepted for the quorum, "
                              f"{len(intake.rejected)} rejected, {max(0.0, remaining):.0f} s to the deadline"
                              if target else "")

    def _report_rejections(self, r: int, intake: RoundLedger, reported: set[str], closing: bool = False) -> None:
        """Each rejection in one line as soon as it is decided; those still waiting for their files when the round
        closes, at the close."""
        shown = [x for x in intake.rejected_records() if closing or x.worker not in intake.pending]
        new = [x for x in shown if f"{x.worker}/{x.reason}" not in reported]
        for x in new:
            reported.add(f"{x.worker}/{x.reason}")
            self.log(f"round {r}: rejected {x.worker} ({x.reason}): {x.detail}")
        for worker, (_, problem) in sorted(intake.pending.items()):  # not the worker's own (yet): said at once
            said = f"{worker}/{problem.reason.value}/waits"
            if not closing and not problem.reason.syncing and said not in reported:
                reported.add(said)
                self.log(f"round {r}: {worker}'s update does not count yet ({problem.reason.value}): {problem.detail}; "
                         "waiting for a marker that does until the round closes")
        if new and not closing:  # `fedsync status` shows them from the lease while the round is open
            self.lease.update(self.lease.record.state, r, self.lease.record.note, shown)

    @staticmethod
    def _stuck(r: int, intake: RoundLedger, workers: list[str]) -> str:
        why = "; ".join(f"{w}: {intake.rejected[w].reason} ({intake.rejected[w].detail})" for w in workers)
        diverged = {Reason.NON_FINITE.value, Reason.NORM_OUTLIER.value, Reason.SPOILS_AGGREGATE.value,
                    Reason.DIVERGED.value}
        advice = ("training diverged or an update is far too large: start a new share with a lower lr "
                  "(--set lr=...)" if any(intake.rejected[w].reason in diverged for w in workers)
                  else "fix what the reasons name on those workers, then start this coordinator again")
        return f"round {r} cannot close: every live assigned worker's update was rejected ({why}); {advice}"

    @staticmethod
    def _record(r: int, outcomes: list[Outcome], intake: RoundLedger, late: LateLedger) -> None:
        intake.record([o for o in outcomes if o.candidate.round == r])
        late.record([o for o in outcomes if o.candidate.round != r])

    def _screen(self, r: int, aggregator: Aggregator, model_norm: float, intake: RoundLedger,
                late: LateLedger) -> None:
        """Reject accepted updates too large to be honest (fedsync/aggregation/screening.py), judged again as
        more arrive: the median moves."""
        found = outliers(aggregator.norms, model_norm, self.cfg.screen_factor, self.cfg.screen_max_ratio)
        if found:
            self._record(r, aggregator.drop({c: Unusable(Reason.NORM_OUTLIER, why) for c, why in found.items()}),
                         intake, late)

    def _take_out_largest(self, r: int, aggregator: Aggregator, intake: RoundLedger, late: LateLedger) -> None:
        """The aggregate is not finite: reject the largest accepted update and rebuild the sums without it."""
        norms = aggregator.norms
        worst = max(norms, key=lambda c: norms[c])
        problem = Unusable(Reason.SPOILS_AGGREGATE, f"with it (L2 norm {norms[worst]:.4g}, the largest) the new "
                                                    "global model was not finite")
        self._record(r, aggregator.drop({worst: problem}), intake, late)
        self.log(f"round {r}: the aggregate was not finite; {worst.worker}'s update taken out, aggregating again")

    # -- closing -------------------------------------------------------------------------------------------

    def _close(self, r: int, a: Assignment, accepted: list[Accepted], intake: RoundLedger, late: list[Late],
               new_state: dict[str, torch.Tensor], server_state: dict[str, torch.Tensor], reason: str, seconds: float,
               timings: dict[str, float], step_scale: float) -> None:
        # 1. the aggregate, where the next round (or the end of the run) will look for it, and the optimizer's state
        name = self.share.model_after(r, self.opts.rounds)
        ref = self.backoff.run(lambda: save_state(self.share.write, name, new_state, name), f"writing {name}")
        state_ref = None
        if self.optimizer.stateful:
            state_name = self.share.server_state(r)
            state_ref = self.backoff.run(lambda: save_state(self.share.write, state_name, server_state),
                                         f"writing {state_name}")
        total = sum(x.samples for x in accepted)
        train_loss = sum(x.train_loss * x.samples for x in accepted) / total
        # 2. the decision, written last: the round is closed from here on
        rejected = intake.rejected_records()
        summary = Summary(format=FORMAT_VERSION, round=r, closed_because=reason, seconds=round(seconds, 3),
                          model=ref, accepted=accepted, rejected=rejected,
                          missing=intake.missing(), ignored=sorted(intake.ignored), late=late,
                          aggregation=self.rule.name, step_scale=round(step_scale, 6),
                          metrics={"train_loss": train_loss},
                          timings={k: round(v, 6) for k, v in timings.items()},
                          federated=federated_mean([x.evaluation for x in accepted if x.evaluation]),
                          closed_at=utc_stamp(), traffic=self._traffic(a, accepted, rejected),
                          compute=self._compute(accepted), server_optimizer=self.optimizer.name,
                          server_state=state_ref)
        self.backoff.run(lambda: self.share.write_yaml(self.share.summary(r), to_dict(summary)),
                         f"writing round {r}'s summary")
        crash_point(f"coordinator:after-summary:{r}")
        self.server_state = server_state
        self.reporter.refresh()
        self._prune(r)
        if self.nudge:
            self.nudge.scan(self.share.summary(r))
        # 3. its quality on the held-out set, measured beside the next round (which starts from it as is)
        if due(r, self.opts.rounds, self.cfg.eval_every):
            self.evaluator.submit(r, ref, new_state)
        self.carried = (ref.blake3, new_state)
        with self.rows_lock:
            self.rows[r] = self._metrics_row(summary)
        self._write_metrics()
        held = (f"; its global model on the workers' {summary.federated.samples} held-out examples: accuracy "
                f"{summary.federated.accuracy:.4f}") if summary.federated else ""
        self.log(f"round {r}/{self.opts.rounds} closed ({reason}): {len(accepted)} accepted, "
                 f"{len(summary.rejected)} rejected, {len(summary.missing)} missing; train loss {train_loss:.4f}, "
                 f"{seconds:.2f} s{held}")
        for x in late:
            self.log(f"round {r}: late update from {x.worker} for round {x.round} {x.outcome} ({x.detail})")

    def _landed(self, ev: Evaluation) -> None:
        """A round's evaluation is written (called in the evaluation thread): into metrics.csv and the log."""
        with self.rows_lock:
            self.rows[ev.round].update(self._evaluation_row(ev))
        self._write_metrics()
        self.reporter.refresh()
        self.log(f"round {ev.round}: test accuracy {ev.test_accuracy:.4f}, test loss {ev.test_loss:.4f} "
                 f"({ev.samples} examples on {ev.device}, {ev.seconds:.2f} s)")

    def _finish(self) -> FinalMarker:
        last = self.backoff.run(lambda: load_summary(self.share, self.opts.rounds), "reading the last summary")
        evaluated = self.evaluator.wait(self.opts.rounds)
        final = FinalMarker(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=self.opts.rounds,
                            model=FileRef(names.FINAL_MODEL, last.model.blake3, last.model.bytes),
                            test_accuracy=evaluated.test_accuracy)
        final.signature = self.identity.sign(final_message(final))
        self.backoff.run(lambda: self.share.write_yaml(self.share.final_marker, to_dict(final)), "writing final.yaml")
        self.log(f"run {self.manifest.run_id} finished after {final.round} rounds: test accuracy "
                 f"{final.test_accuracy:.4f}; model in {self.share.where(self.share.final_model)}")
        return final

    def _remove_stale_temps(self) -> None:
        """Temporary files of the coordinator's own files, left by a crash; readers skip them anyway."""
        removed = self.share.remove_temporaries("", set(names.COORDINATOR_ROOT_FILES))
        for r in self.share.rounds():
            removed += self.share.remove_temporaries(self.share.round_dir(r), set(names.COORDINATOR_ROUND_FILES))
        if removed:
            self.log(f"removed {removed} temporary file(s) left by an interrupted coordinator")

    @staticmethod
    def _metrics_row(s: Summary) -> dict[str, object]:
        """A round's row before its evaluation lands: the test columns stay empty until then. The federated
        columns measure the model the round started from, on the workers' held-out parts."""
        fed = s.federated
        return {"round": s.round, "test_accuracy": "", "test_loss": "", "train_loss": f"{s.metrics['train_loss']:.6f}",
                "updates_accepted": len(s.accepted), "updates_rejected": len(s.rejected), "seconds": s.seconds,
                "federated_accuracy": f"{fed.accuracy:.6f}" if fed else "",
                "federated_loss": f"{fed.loss:.6f}" if fed else "", "closed_at": s.closed_at or "",
                "down_bytes": s.traffic.down_bytes if s.traffic else "",
                "up_bytes": s.traffic.up_bytes if s.traffic else "",
                "train_s": round(sum(s.compute.values()), 4) if s.traffic else ""}

    @staticmethod
    def _traffic(a: Assignment, accepted: list[Accepted], rejected: list[Rejected]) -> Traffic:
        """The round's model went down to every worker that answered (accepted or rejected); the accepted updates
        came up."""
        answered = {x.worker for x in accepted} | {x.worker for x in rejected}
        return Traffic(model_bytes=a.model.bytes, down_bytes=a.model.bytes * len(answered & set(a.workers)),
                       up_bytes=sum(x.bytes or 0 for x in accepted))

    def _compute(self, accepted: list[Accepted]) -> dict[str, float]:
        """The accepted updates' training seconds by device kind (the worker's registered device name)."""
        seconds: dict[str, float] = {}
        for x in accepted:
            info = self.liveness.info.get(x.worker)
            kind = info.device_name if info is not None else x.device
            seconds[kind] = round(seconds.get(kind, 0.0) + (x.train_s or 0.0), 4)
        return seconds

    @staticmethod
    def _evaluation_row(ev: Evaluation) -> dict[str, object]:
        return {"test_accuracy": f"{ev.test_accuracy:.6f}", "test_loss": f"{ev.test_loss:.6f}"}

    def _write_metrics(self) -> None:
        """metrics.csv, whole, from the rows known now; both threads call it, one at a time."""
        with self.rows_lock:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows[r] for r in sorted(self.rows))
            self.backoff.run(lambda: self.share.write(self.share.metrics, out.getvalue().encode()),
                             "writing metrics.csv")
