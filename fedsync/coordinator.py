"""The coordinator: opens rounds, takes in updates as their markers appear, closes and aggregates.

Everything it knows comes from the share, so a restart with the same command picks the run up where the
files say it is. Read top to bottom: start or continue the run, then per round open, collect, close.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import Timeout

from fedsync.aggregation.optimizers import make_optimizer
from fedsync.aggregation.privacy.mean import PrivateMean
from fedsync.aggregation.privacy.noise import fresh_generator
from fedsync.aggregation.rules import make_rule
from fedsync.base import defaults
from fedsync.base.clock import utc_stamp
from fedsync.base.errors import ConfigError, FedsyncError, RunStuck, ShareError, stopped_by
from fedsync.base.faults import crash_point
from fedsync.base.logs import Log, make_log
from fedsync.learning.data import Dataset, Source
from fedsync.learning.device import DeviceChoice, DeviceFacts, choose_device
from fedsync.learning.models import constrained_buffers
from fedsync.run.config import RunConfig, load_data
from fedsync.run.coordinating.budget import Budget, RoundPrivacy, describe, ended_at_budget
from fedsync.run.coordinating.evaluation import Evaluator, Probe, due, federated_mean
from fedsync.run.coordinating.intake import Closing, RoundIntake
from fedsync.run.coordinating.ledger import load_summary
from fedsync.run.coordinating.news import RoundNews
from fedsync.run.coordinating.planning import Planner
from fedsync.run.coordinating.report import Metrics, Reporter, compute, traffic
from fedsync.run.coordinating.resume import own_assignment, remove_stale_temporaries, replay, saved_server_state
from fedsync.run.coordinating.retention import Retention
from fedsync.run.coordinating.secure import SecureRound
from fedsync.run.coordinating.verdicts import history, ruined, to_exclude
from fedsync.run.liveness import Liveness
from fedsync.run.start import check_privacy, check_run, sealing_key, task_record
from fedsync.run.trust import Trust, check_coordinator_key
from fedsync.storage import names
from fedsync.storage.keys import Identity, coordinator_key_path, load_identity, sealing_key_path
from fedsync.storage.lease import Lease, read_lease
from fedsync.storage.locks import local_lock
from fedsync.storage.manifest import new_manifest, write_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    Evaluation,
    FileRef,
    FinalMarker,
    Manifest,
    PrivacyRecord,
    Summary,
    to_dict,
)
from fedsync.storage.reasons import Unusable
from fedsync.storage.sealing import SealingIdentity
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, final_message
from fedsync.storage.syncthing import SyncthingNudge
from fedsync.storage.trouble import Backoff
from fedsync.storage.watch import ShareWatcher
from fedsync.tensors.files import load_verified, save_state


@dataclass
class CoordinatorOptions:
    share: Share
    config: RunConfig
    rounds: int = defaults.ROUNDS
    watch: str = defaults.WATCH
    rescan: float = defaults.RESCAN_S
    created_by: str = "coordinator"
    data_root: str | None = None   # where the task's test data is on this machine; None: the config's data_root
    syncthing: str | None = None   # URL of this machine's Syncthing API, to be nudged after each write
    syncthing_key: str | None = None
    key: Path | None = None        # this coordinator's private key; None: coordinator.pem in the key folder
    device: str = defaults.DEVICE  # where it evaluates
    log: Log = field(default_factory=lambda: make_log("coordinator"))


SCAN_SHARE = 0.5  # the most of a collecting coordinator's time that rescanning the share may take


class BudgetSpent(Exception):
    """The next round's release would take the run past dp.target_epsilon: the run ends before it."""


def run_coordinator(opts: CoordinatorOptions) -> FinalMarker:
    share = opts.share
    if opts.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    share.require()  # never a run on the local disk in place of a share that is not mounted yet
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
        nudge = SyncthingNudge(opts.syncthing, opts.syncthing_key, share, opts.log) if opts.syncthing else None
        existing = check_run(share, opts.config)
        check_privacy(opts.config)
        choice = choose_device(opts.device, DeviceFacts.probe())  # an explicit device that is absent fails here
        identity, created = load_identity(opts.key or coordinator_key_path())
        if existing is not None:
            check_coordinator_key(share, existing, identity)
        closed = share.closed_rounds()
        if closed and closed[-1] > opts.rounds:
            raise ConfigError(f"the run in {share.where()} already closed {closed[-1]} rounds: "
                              f"--rounds must be at least {closed[-1]}")
        opener, sealing_created = sealing_key(opts.config, identity, existing)
        dataset, test = load_data(opts.config, opts.data_root or opts.config.data_root, opts.log)
        manifest = existing or new_manifest(opts.config.as_dict(), opts.created_by, identity, task_record(opts.config),
                                            opener.recipient if opener else None)
        lease = Lease(share, manifest.run_id, opts.config.heartbeat, opts.config.worker_timeout, opts.log,
                      opts.rounds)
        lease.check()
        if existing is None:
            write_manifest(share, manifest)
        lease.acquire()
        opts.log(f"coordinator key {identity.path}{' (created now)' if created else ''}: fingerprint "
                 f"{identity.fingerprint}; workers pin it at first contact (or pass --coordinator-key "
                 f"{identity.public})")
        if opener is not None:
            opened = sealing_key_path(identity.path)
            opts.log(f"updates are sealed to {opener.recipient}; the key that opens them is {opened}"
                     f"{' (created now)' if sealing_created else ''}: keep it with the signing key. Open one update by "
                     f"hand: age -d -i {opened} -o update.safetensors NNNN/updates/NAME.safetensors.age")
        why = "it ended unexpectedly"  # the lease says why the run stopped: workers and `fedsync status` tell it
        try:
            with ShareWatcher(share, opts.watch, list_store=False) as watcher:
                final = Coordinator(share, manifest, opts, dataset, test, watcher, lease, identity, choice,
                                    nudge, opener).run()
                why = ""
                return final
        except KeyboardInterrupt as e:
            why = f"stopped by {stopped_by(e)}; the same command continues the run"
            raise
        except Exception as e:  # FedsyncError: its message says what to change; anything else is a bug to report
            why = str(e) if isinstance(e, FedsyncError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            lease.release("stopped" if why else "finished", why or None)
    finally:
        lock.release()


def _lease_holder(share: Share) -> str:
    lease = read_lease(share)
    return f" (pid {lease.pid})" if lease else ""


class Coordinator:
    def __init__(self, share: Share, manifest: Manifest, opts: CoordinatorOptions, dataset: Dataset | None,
                 test: Source, watcher: ShareWatcher, lease: Lease, identity: Identity, device: DeviceChoice,
                 nudge: SyncthingNudge | None = None, opener: SealingIdentity | None = None) -> None:
        self.share, self.manifest, self.opts, self.cfg = share, manifest, opts, opts.config
        self.watcher, self.lease, self.log = watcher, lease, opts.log
        self.task = self.cfg.resolved_task()
        self.identity, self.nudge, self.opener = identity, nudge, opener
        self.liveness = Liveness(share, self.cfg.worker_timeout)
        self.trust = Trust(share, manifest.run_id, identity, self.cfg.trust, self.liveness.public_key, self.log)
        self.backoff = Backoff(self.log)
        model = self.task.build_model(self.cfg.model, seed=self.cfg.seed)
        self.buffers = constrained_buffers(model)
        self.rule = make_rule(self.cfg.aggregation, self.cfg.momentum, self.cfg.trim, self.cfg.byzantine)
        self.optimizer = make_optimizer(self.cfg.server_settings(),
                                        frozenset(name for name, p in model.named_parameters() if p.requires_grad))
        # round 1's model, kept as its state alone (copied when round 1 opens): the model goes (a language model's
        # base is held by the probe and the evaluator, not a third time here)
        self.initial = dict(model.state_dict())
        del model
        self.server_state: dict[str, torch.Tensor] = {}  # the optimizer's, after the last closed round; none: stateless
        self.carried: tuple[str, dict[str, torch.Tensor]] | None = None  # the aggregate just written: its hash, state
        self.planner = Planner(share, self.cfg, self.task, dataset, self.liveness, self.log)
        self.retention = Retention(share, self.cfg.keep_rounds)
        self.metrics = Metrics(share, self.backoff)
        if device.fallback:
            self.log(f"WARNING: evaluating on the CPU although a GPU is present: {device.fallback}")
        self.reporter = Reporter(share, manifest, self.log)
        self.evaluator = Evaluator(share, self.task, self.cfg, test, device.device, self.log,
                                   self._landed)
        self.probe = Probe(self.task, self.cfg, test)
        self.budget: Budget | None = None  # dp: what the closed rounds spent (read from their summaries)
        self.plans: dict[int, RoundPrivacy] = {}  # dp: each open round's mechanism
        self.extended_from: FileRef | None = None  # the final model of the finished run this one extends

    def run(self) -> FinalMarker:
        interrupted = False
        try:
            return self._run()
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: stop promptly, without drawing the report once more
            interrupted = True
            raise
        finally:
            self.evaluator.close()
            self.reporter.close(draw=not interrupted)  # else drawn once more: the report shows how the run ended

    def _run(self) -> FinalMarker:
        # Resume: the first round without a summary is the one to work on.
        closed = self.share.closed_rounds()
        removed = remove_stale_temporaries(self.share)
        if removed:
            self.log(f"removed {removed} temporary file(s) left by an interrupted coordinator")
        unevaluated = replay(self.share, closed, self.metrics, self.opts.rounds, self.cfg.eval_every)
        if closed:  # a crash may have left it a row short
            self.server_state = saved_server_state(self.share, self.optimizer, load_summary(self.share, closed[-1]))
            self.metrics.write()
            self.retention.prune(closed[-1])  # a crash may have come between a summary and its pruning
        for r, model in unevaluated:
            if self.share.exists(model.file):
                self.evaluator.submit(r, model)
            else:
                self.log(f"round {r}: its model was pruned (keep_rounds) before it was evaluated; not evaluated")
        r = (closed[-1] + 1) if closed else 1
        if self.cfg.dp is not None:
            self.budget = Budget(self.cfg.dp, self.cfg.clip_norm, [load_summary(self.share, k) for k in closed])
            ended = ended_at_budget(self.share, self.manifest.run_id, self.identity.public, closed)
            if ended is not None:
                self.log(f"run {self.manifest.run_id} already ended after round {ended.round}: "
                         f"{ended.stopped_because}; nothing more to do (a new run needs a new share)")
                return ended
        if r <= self.opts.rounds:
            self.extended_from = self._final_model()
            self.share.remove(self.share.final_marker)  # continuing a finished run: it is not finished
        self.log(f"run {self.manifest.run_id}: {self.cfg.task}/{self.cfg.model}, rounds {r}..{self.opts.rounds}, "
                 f"share {self.share.where()}; {self.cfg.recipe()}")
        self.log(f"watching the share by {self.watcher.describe}")
        while r <= self.opts.rounds:
            # Unusable too: its own files vanish for a moment when the share's mount drops between two reads
            try:
                assignment, state = self.backoff.run(lambda: self._open_round(r), f"opening round {r}",
                                                     retry=(OSError, Unusable))
            except BudgetSpent as e:
                return self._finish(r - 1, str(e))
            self._collect_and_close(r, assignment, state)
            r += 1
        return self._finish(self.opts.rounds)

    # -- opening -----------------------------------------------------------------------------------------

    def _open_round(self, r: int) -> tuple[Assignment, dict[str, torch.Tensor]]:
        """The round's assignment and global model: read back if already written, else written now."""
        if self.share.exists(self.share.assignment(r)):
            a = own_assignment(self.share, r, self.identity, self.log)
            if a is not None:
                self._plan(r, a.workers)
                return a, load_verified(self.share, self.share.global_model(r), a.model)
        if r == 1:
            state = {k: v.clone() for k, v in self.initial.items()}
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
        plan = self._plan(r, workers)
        if plan is not None and self.budget is not None:
            why = self.budget.over_target(plan)
            if why:
                raise BudgetSpent(why)
        shards, shard_list = self.planner.cut(len(workers))
        a = Assignment(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=r, rounds=self.opts.rounds,
                       model=model_ref, num_shards=len(shards), time_budget_s=float(self.cfg.round_timeout),
                       workers=self.planner.tasks(r, workers, shards), shards=shard_list)
        a.signature = self.identity.sign(assignment_message(a))
        self.share.make_folder(self.share.updates_dir(r))
        self.share.write_yaml(self.share.assignment(r), to_dict(a))  # last: the round is open from here on
        if self.nudge:
            self.nudge.scan(self.share.round_dir(r))
        self.log(f"round {r}/{self.opts.rounds} open: {len(workers)} worker(s) {', '.join(workers)}")
        return a, state

    def _plan(self, r: int, workers: list[str]) -> RoundPrivacy | None:
        """Round r's privacy mechanism (dp), from the workers it assigns and those enrolled (registered, trusted)."""
        if self.budget is None:
            return None
        enrolled = {w for w in self.liveness.info if self.trust.key_of(w) is not None} | set(workers)
        self.plans[r] = self.budget.plan(len(workers), len(enrolled))
        return self.plans[r]

    def _wait(self, seconds: float) -> None:
        """Sleep until the share changes or `seconds` pass; stop if another coordinator took the share."""
        self.watcher.wait(seconds)
        if self.lease.lost.is_set():
            raise ShareError(f"another coordinator took over {self.share.where()}; this one stopped")

    def _wait_for_workers(self, r: int) -> list[str]:
        said: list[str] | None = None  # the live workers when it was last said: said again as they change
        while True:
            for name in self.liveness.scan():
                info = self.liveness.info[name]
                self.log(f"worker {name} registered ({info.device}: {info.device_name}, {info.precision}, "
                         f"torch {info.torch})")
                if info.device_fallback:
                    self.log(f"WARNING: worker {name} trains on the CPU although it has a GPU: "
                             f"{info.device_fallback}")
            for name, problem in self.liveness.unsaid():
                self.log(f"WARNING: {self.share.where(self.share.worker_file(name))} does not count as a worker: "
                         f"{problem}")
            self.trust.refresh()
            live = [w for w in self.trust.admit_all(self.liveness.live()) if self.planner.equipped(w)]
            if len(live) >= self.cfg.min_workers:
                return live
            if live != said:  # said in the log and, for `fedsync status`, in the lease
                said = live
                note = (f"round {r} opens when {self.cfg.min_workers} worker(s) are live (min_workers), {len(live)} "
                        f"so far{': ' + ', '.join(live) if live else ''}; start `fedsync worker --share "
                        f"{self.share.where()}` on more machines")
                self.lease.update("waiting for workers", r, note)
                self.log(note)
            self._wait(self.opts.rescan)

    # -- collecting ----------------------------------------------------------------------------------------

    def _collect_and_close(self, r: int, a: Assignment, state: dict[str, torch.Tensor]) -> None:
        self.lease.update("collecting", r)
        if self.cfg.secure_aggregation:
            self._close(a, self._collect_secure(r, a, state))
            return
        plan = self.plans.get(r)
        rule = self.rule if plan is None else PrivateMean(plan.central_std, plan.denominator, fresh_generator())
        intake = self.backoff.run(lambda: RoundIntake(self.share, r, a, state, self.cfg, self.planner.bound, rule,
                                                      self.trust, self.log, self.buffers, self.probe, self.opener,
                                                      plan),
                                  f"reading the rounds before round {r}")
        news = RoundNews(r, self.log, self.lease)
        try:
            while True:
                scan_started = time.monotonic()
                # scan: registrations, trusted keys, and the markers that changed since the last look
                try:
                    self.liveness.scan()
                    self.trust.admit_all(self.liveness.live())  # a changed or unapproved key is said when it appears
                    if self.trust.refresh():  # a key approved: updates waiting on it are judged again
                        intake.recheck()
                    candidates = intake.scan()
                except OSError as e:
                    self._wait(self.backoff.failed(e, f"looking for round {r}'s updates"))
                    continue
                scan_s = time.monotonic() - scan_started
                # take: verify and add each update in one read, then screen and clip what was added
                if candidates:
                    intake.take(candidates)
                    if intake.ledger.accepted:
                        crash_point(f"coordinator:collecting:{r}")
                news.rejections(intake)
                self.evaluator.check()
                # decide: the quorum, every worker reported, or the deadline
                decision = intake.decide(set(self.liveness.live()), lambda: self._ruin(r))
                news.progress(intake, decision)
                if not decision.reason:
                    self._pace(intake, scan_started, scan_s)
                    continue
                # aggregate: the next global model; not finite, the largest update is taken out and the rules run again
                # it reads accepted files again (screens, buffers' median): a share away for a moment is waited out
                closing = self.backoff.run(lambda: intake.aggregate(decision.reason, state, self.optimizer,
                                                                    self.server_state), f"aggregating round {r}")
                if closing is not None:
                    break
        finally:
            intake.close()
        news.rejections(intake, closing=True)
        # close: the aggregate, then the summary (last), then the evaluation beside the next round
        self._close(a, closing)

    def _collect_secure(self, r: int, a: Assignment, state: dict[str, torch.Tensor]) -> Closing:
        """A secure-aggregation round (fedsync/run/coordinating/secure.py): the rosters after each of the workers'
        steps, then the unmasked sum, or the round redone."""
        secure = SecureRound(self.share, r, a, state, self.cfg, self.planner.bound, self.trust, self.identity,
                             self.log, self.plans.get(r))
        while True:
            try:
                self.liveness.scan()
                self.trust.admit_all(self.liveness.live())
                self.trust.refresh()
                closing = secure.advance(set(self.liveness.live()), self.optimizer, self.server_state)
            except OSError as e:
                self._wait(self.backoff.failed(e, f"looking for round {r}'s secure-aggregation files"))
                continue
            self.evaluator.check()
            if closing is not None:
                return closing
            remaining = secure.remaining()
            self._wait(min(self.opts.rescan, remaining) if remaining > 0 else self.opts.rescan)

    def _pace(self, intake: RoundIntake, scan_started: float, scan_s: float) -> None:
        """Wait for a change or the deadline. A scan lists workers/ and updates/ whole, and files arrive one event at
        a time: paced, a round of N workers costs O(N) scans' worth of time in all, not N scans of N files."""
        remaining = intake.remaining()
        self._wait(min(self.opts.rescan, remaining) if remaining > 0 else self.opts.rescan)
        time.sleep(max(0.0, scan_started + scan_s / SCAN_SHARE - time.monotonic()))

    # -- closing -------------------------------------------------------------------------------------------

    def _close(self, a: Assignment, c: Closing) -> None:
        r = c.round
        if c.clipped and self.budget is None:  # under dp who was clipped is not said (it tells about their data)
            self.log(f"round {r}: clipped (clip_norm, clip_factor x the round's median norm): " + ", ".join(
                f"{w} (L2 norm {n:.4g})" for w, n in sorted(c.clipped.items())))
        # 1. the aggregate, where the next round (or the end of the run) will look for it, and the optimizer's state
        name = self.share.model_after(r, self.opts.rounds)
        seen = self._seen(name)
        ref = self.backoff.run(lambda: save_state(self.share.write, name, c.new_state, name), f"writing {name}")
        state_ref = None
        if self.optimizer.stateful:
            state_name = self.share.server_state(r)
            state_ref = self.backoff.run(lambda: save_state(self.share.write, state_name, c.server_state),
                                         f"writing {state_name}")
        crash_point(f"coordinator:before-summary:{r}")
        total = sum(x.samples for x in c.accepted)
        train_loss = sum(x.train_loss * x.samples for x in c.accepted) / total if total else math.nan  # redone
        # 2. the decision, written last: the round is closed from here on
        devices = {w: info.device_name for w, info in self.liveness.info.items()}
        summary = Summary(format=FORMAT_VERSION, round=r, closed_because=c.reason, seconds=round(c.seconds, 3),
                          model=ref, accepted=c.accepted, rejected=c.rejected, missing=c.missing, ignored=c.ignored,
                          late=c.late, aggregation=self.rule.name, step_scale=round(c.step_scale, 6),
                          metrics={"train_loss": train_loss},
                          timings={k: round(v, 6) for k, v in c.timings.items()},
                          federated=federated_mean([x.evaluation for x in c.accepted if x.evaluation]),
                          closed_at=utc_stamp(), traffic=traffic(a, c.accepted, c.rejected),
                          compute=compute(c.accepted, devices), server_optimizer=self.optimizer.name,
                          server_state=state_ref, privacy=self._privacy(c, seen))
        self.backoff.run(lambda: self.share.write_yaml(self.share.summary(r), to_dict(summary)),
                         f"writing round {r}'s summary")
        crash_point(f"coordinator:after-summary:{r}")
        self.server_state = c.server_state
        self.reporter.refresh()
        self.retention.prune(r)
        if self.nudge:
            self.nudge.scan(self.share.summary(r))
        # 3. its quality on the held-out set, measured beside the next round (which starts from it as is)
        if due(r, self.opts.rounds, self.cfg.eval_every):
            self.evaluator.submit(r, ref, c.new_state)
        self.carried = (ref.blake3, c.new_state)
        self._exclude(r)
        self.metrics.closed(summary)
        self.metrics.write()
        held = (f"; its global model on the workers' {summary.federated.samples} held-out examples: accuracy "
                f"{summary.federated.accuracy:.4f}") if summary.federated else ""
        self.log(f"round {r}/{self.opts.rounds} closed ({c.reason}): {len(c.accepted)} accepted, "
                 f"{len(summary.rejected)} rejected, {len(summary.missing)} missing; train loss {train_loss:.4f}, "
                 f"{c.seconds:.2f} s{held}")
        for x in c.late:
            self.log(f"round {r}: late update from {x.worker} for round {x.round} {x.outcome} ({x.detail})")

    def _final_model(self) -> FileRef | None:
        """final.yaml's model, when the run had finished (it is being extended now)."""
        try:
            return self.share.read_record(FinalMarker, self.share.final_marker).model
        except Exception:  # noqa: BLE001 - absent or unreadable: the run had not finished
            return None

    def _seen(self, name: str) -> bool:
        """Whether a model of the closing round may have been read already (dp): its file is there, written by a
        coordinator that stopped before the round's summary, and it is not the final model of the run this one
        extends."""
        if self.budget is None or not self.share.exists(name):
            return False
        if name == self.share.final_model and self.extended_from is not None:
            try:
                self.share.read_verified(name, self.extended_from)
                return False
            except Unusable:
                return True
        return True

    def _privacy(self, c: Closing, seen: bool) -> PrivacyRecord | None:
        """Round's privacy record (dp): no release when redone; two when a model of it was written before a stop
        and may have been read."""
        if self.budget is None:
            return None
        plan = self.plans[c.round]
        releases = 0 if c.reason.startswith("redone") else 2 if seen else 1
        record = self.budget.record(plan, c.noise_multiplier or plan.noise_multiplier, releases, c.fraction_under)
        self.log(describe(c.round, record))
        return record

    def _ruin(self, r: int) -> str:
        """Whether updates accepted before round r ruined its model (said when round r cannot close): from the
        evaluations landed so far, round r - 1's waited for when it is due."""
        if r > 1 and due(r - 1, self.opts.rounds, self.cfg.eval_every):
            self.evaluator.wait(r - 1)
        evaluated = self.metrics.tested()
        summaries = self.backoff.run(lambda: {k: load_summary(self.share, k) for k in evaluated},
                                     "reading the evaluated rounds' summaries")
        return ruined(history(summaries, evaluated))

    def _exclude(self, r: int) -> None:
        """Stop giving work to workers whose updates were rejected for what they held in exclude_after rounds in a
        row (trust.yaml's state excluded; `fedsync trust NAME` trusts them again)."""
        after = self.cfg.exclude_after
        if after < 1 or r < after:
            return
        recent = self.backoff.run(lambda: [load_summary(self.share, k) for k in range(r - after + 1, r + 1)],
                                  "reading the last rounds' summaries")
        for worker, why in to_exclude(recent, after).items():
            self.backoff.run(lambda: self.trust.exclude(worker), f"excluding worker {worker} in trust.yaml")
            self.log(f"worker {worker}: excluded, no more work: {why}; `fedsync trust {worker} --share "
                     f"{self.share.where()}` trusts it again")

    def _landed(self, ev: Evaluation) -> None:
        """A round's evaluation is written (called in the evaluation thread): into metrics.csv and the log."""
        self.metrics.evaluated(ev)
        self.metrics.write()
        self.reporter.refresh()
        self.log(f"round {ev.round}: test accuracy {ev.test_accuracy:.4f}, test loss {ev.test_loss:.4f} "
                 f"({ev.samples} examples on {ev.device}, {ev.seconds:.2f} s)")

    def _finish(self, round_: int, stopped: str | None = None) -> FinalMarker:
        """Sign the model of round `round_` as the run's result: the last of --rounds, or (stopped: why) the last
        round the privacy budget allowed, whose model is copied to final.safetensors."""
        if round_ < 1:
            raise ConfigError(f"{stopped}: not even round 1 fits; raise dp.noise_multiplier or dp.target_epsilon in "
                              "a new share")
        last = self.backoff.run(lambda: load_summary(self.share, round_), "reading the last summary")
        if stopped is not None:
            self.log(f"run {self.manifest.run_id} ends after round {round_} of {self.opts.rounds}: {stopped}")
            if last.model.file != self.share.final_model:
                data = self.share.read_verified(last.model.file, last.model)
                self.backoff.run(lambda: self.share.write(self.share.final_model, data), "writing the final model")
            if not due(round_, self.opts.rounds, self.cfg.eval_every) and not self.share.exists(
                    self.share.evaluation(round_)):
                self.evaluator.submit(round_, last.model)
        evaluated = self.evaluator.wait(round_)
        if not math.isfinite(evaluated.test_loss):  # a ruined model is never signed as the run's result
            raise RunStuck(f"round {round_}'s model evaluates to a test loss of {evaluated.test_loss} on "
                           f"{evaluated.samples} held-out examples: it is not signed as the final model. Updates "
                           "accepted into it ruined it (their rounds' summaries name them; `fedsync results` shows "
                           "where the loss stopped being finite, and `fedsync export --round N` an earlier round's "
                           "model)")
        final = FinalMarker(format=FORMAT_VERSION, run_id=self.manifest.run_id, round=round_,
                            model=FileRef(names.FINAL_MODEL, last.model.blake3, last.model.bytes),
                            test_accuracy=evaluated.test_accuracy, stopped_because=stopped,
                            epsilon=round(self.budget.spent(), 6) if self.budget is not None else None)
        final.signature = self.identity.sign(final_message(final))
        self.backoff.run(lambda: self.share.write_yaml(self.share.final_marker, to_dict(final)), "writing final.yaml")
        self.log(f"run {self.manifest.run_id} finished after {final.round} rounds: test accuracy "
                 f"{final.test_accuracy:.4f}; model in {self.share.where(self.share.final_model)}")
        return final
