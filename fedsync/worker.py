"""The worker: registers, keeps a heartbeat, and trains on its shard each round it is assigned.

Read top to bottom: wait for the run, register, then per round find the assignment, verify the global
model, train, and write the update followed by its marker (the marker last: docs/DESIGN.md, invariant 3).
"""

from __future__ import annotations

import hashlib
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from filelock import Timeout

from fedsync import __version__
from fedsync.base import defaults
from fedsync.base.errors import ConfigError, ShareError
from fedsync.base.faults import crash_point
from fedsync.base.logs import Log, Logger, make_log
from fedsync.fedavg import delta
from fedsync.learning.capture import capture, plan_capture
from fedsync.learning.data import Source, first
from fedsync.learning.device import DeviceChoice, DeviceFacts, choose_device, describe
from fedsync.learning.doctor import start_check
from fedsync.learning.dp_sgd import dp_local_train, refusals
from fedsync.learning.lora import base_storage
from fedsync.learning.predict import measure_inference
from fedsync.learning.tasks import Task
from fedsync.learning.train import Report, TrainSettings, evaluate, local_train, measure_throughput
from fedsync.run.config import RunConfig, config_from_dict, on_this_machine
from fedsync.run.liveness import Heartbeat
from fedsync.run.secure import ENCODING
from fedsync.run.start import check_task
from fedsync.run.working.data import WorkerData
from fedsync.run.working.notices import Notices
from fedsync.run.working.private import WorkerBudget
from fedsync.run.working.secure import SecureWorker
from fedsync.run.working.serve import Device, Server
from fedsync.storage import names
from fedsync.storage.keys import Identity, load_identity, pinned_coordinator, worker_key_path
from fedsync.storage.locks import local_lock
from fedsync.storage.manifest import finished, read_manifest, sealing_recipient
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    FinalMarker,
    HeldOut,
    Manifest,
    UpdateMarker,
    WorkerInfo,
    to_dict,
)
from fedsync.storage.reasons import Unusable
from fedsync.storage.sealing import SCHEME, seal, sealed_head
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, fingerprint, update_message, verify
from fedsync.storage.syncthing import SyncthingNudge
from fedsync.storage.trouble import Backoff
from fedsync.storage.watch import ShareWatcher
from fedsync.tensors.files import layout_of, load_verified, save_state
from fedsync.tensors.residuals import ErrorFeedback, encoded_update, residual_dir


@dataclass
class WorkerOptions:
    share: Share
    name: str = field(default_factory=socket.gethostname)
    device: str = defaults.DEVICE
    watch: str = defaults.WATCH
    rescan: float = defaults.RESCAN_S
    wait_for_run: float | None = None   # seconds to wait for fedsync.yaml to appear; None: forever
    data_root: str | None = None        # where the task's data is on this machine; None: the run config's data_root
    base_model: str | None = None       # causal_lm: this machine's base model folder; None: the config's base_model
    quantize: str | None = None         # causal_lm: 4bit holds the base in 4 bits (QLoRA; CUDA only); None: as trained
    memory_budget: int | None = None    # bytes of its own decoded images kept in memory; beyond: streamed; None: auto
    syncthing: str | None = None        # URL of this machine's Syncthing API, to be nudged after each update
    syncthing_key: str | None = None
    key: Path | None = None             # this worker's private key; None: worker-<name>.pem in the key folder
    coordinator_key: str | None = None  # the coordinator's public key; None: pinned from the run at first contact
    capture: str = defaults.CAPTURE
    serve: bool = False                 # also run inference jobs' chunks, and keep doing so after the run ends
    log_json: bool = False              # one JSON object per event instead of a line of text
    log: Log | None = None


def run_worker(opts: WorkerOptions) -> FinalMarker | None:
    share = opts.share
    name = names.check_worker_name(opts.name)
    log = opts.log or make_log(f"worker {name}", opts.log_json)
    share.require()
    facts = DeviceFacts.probe()
    choice = choose_device(opts.device, facts)  # an explicit device this build cannot drive fails here, at once
    nudge = SyncthingNudge(opts.syncthing, opts.syncthing_key, share, log) if opts.syncthing else None
    identity, created = load_identity(opts.key or worker_key_path(name))
    log(f"worker key {identity.path}{' (created now)' if created else ''}: fingerprint {identity.fingerprint}")
    lock = local_lock(share.identity, f"worker-{name}")
    try:
        lock.acquire()
    except Timeout:
        raise ShareError(f"another worker named {name!r} is already running on this machine for {share.where()}; "
                         "give this one another --name") from None
    try:
        with ShareWatcher(share, opts.watch, list_store=False) as watcher:
            manifest = _wait_for_run(share, watcher, opts, log)
            coordinator_key, pinned = pinned_coordinator(manifest.run_id, manifest.coordinator_key,
                                                         opts.coordinator_key)
            how = ("as given with --coordinator-key" if opts.coordinator_key else
                   "pinned on this machine now, at first contact" if pinned else "as pinned on this machine before")
            log(f"coordinator key {fingerprint(coordinator_key)} for run {manifest.run_id}: {how}; this worker trains "
                "only on what that key signs")
            return Worker(share, name, choice, facts, manifest, watcher, opts, log, identity, coordinator_key,
                          nudge).run()
    finally:
        lock.release()


def _wait_for_run(share: Share, watcher: ShareWatcher, opts: WorkerOptions, log: Log) -> Manifest:
    started = time.monotonic()
    announced = False
    while not share.exists(share.manifest):
        if opts.wait_for_run is not None and time.monotonic() - started > opts.wait_for_run:
            raise ShareError(f"no fedsync run appeared in {share.where()} within {opts.wait_for_run:.0f} s: "
                             "start `fedsync coordinator` on this share")
        if not announced:
            log(f"waiting for a coordinator to start a run in {share.where()}")
            announced = True
        watcher.wait(opts.rescan)
    return read_manifest(share)


class Worker:
    def __init__(self, share: Share, name: str, choice: DeviceChoice, facts: DeviceFacts, manifest: Manifest,
                 watcher: ShareWatcher, opts: WorkerOptions, log: Log, identity: Identity, coordinator_key: str,
                 nudge: SyncthingNudge | None = None) -> None:
        self.share, self.name, self.manifest = share, name, manifest
        self.identity, self.coordinator_key = identity, coordinator_key
        self.refused: set[tuple[int, str | None]] = set()  # assignments not the coordinator's: said once
        self.nudge = nudge
        self.watcher, self.opts, self.log = watcher, opts, log
        self.cfg: RunConfig = on_this_machine(config_from_dict(manifest.config, share.where(share.manifest)),
                                              opts.base_model)
        self.task: Task = self.cfg.resolved_task()
        self.notices = Notices(share, name, manifest.run_id, coordinator_key, identity, self.cfg.trust, log)
        record = check_task(manifest, self.cfg)  # another version, layout or base: refused before anything is written
        self.secure = SecureWorker(share, manifest.run_id, name, identity, coordinator_key, log, self.cfg.dp) \
            if self.cfg.secure_aggregation else None
        self.recipient = sealing_recipient(manifest, coordinator_key)  # None: the run keeps plain updates
        self.budget = WorkerBudget(share, manifest.run_id, name, identity.public, self.cfg.worker_dp,
                                   self.cfg.batch_size) if self.cfg.worker_dp else None
        if self.cfg.worker_dp is not None:
            log(f"worker_dp: DP-SGD (Opacus) with noise multiplier {self.cfg.worker_dp.noise_multiplier:g}, each "
                f"example's gradient clipped to {self.cfg.worker_dp.max_grad_norm:g}, in fp32 and eagerly; this "
                f"worker's epsilon so far goes into each of its markers")
        if self.secure is not None:
            log("secure aggregation: this worker's update is sent masked; the coordinator reads only each round's "
                "sum (clipped here to clip_norm first)")
        elif self.recipient is not None:
            log(f"updates are sealed to the coordinator's key {self.recipient} (signed by it): nobody else who reads "
                "the share can read them")
        # checked before registering: nothing found here can fail the worker in the middle of a round
        language = self.task.base_digest is not None  # a base model's weights bound its memory
        choice, self.precision = start_check(opts.device, choice, self.cfg.precision, facts, language)
        self.device = choice.device
        if language:  # its base held in the precision it trains in, or in 4 bits
            self.task = self.cfg.resolved_task(base_storage(self.precision, self.device, opts.quantize))
        elif opts.quantize is not None:
            raise ConfigError(f"--quantize holds causal_lm's base model in 4 bits; task {self.cfg.task} has none")
        if choice.fallback:
            log(f"WARNING: training on the CPU although a GPU is present: {choice.fallback}")
        device_name, capability = describe(self.device, facts)
        info = WorkerInfo(format=FORMAT_VERSION, name=name, host=socket.gethostname(), fedsync=__version__,
                          torch=str(torch.__version__), device=self.device, device_name=device_name,
                          cuda_capability=capability, state="starting", round=None, heartbeat=0,
                          precision=self.precision, device_fallback=choice.fallback, public_key=identity.public)
        self.heartbeat = Heartbeat(share, info, self.cfg.heartbeat, log)
        self.backoff = Backoff(log)
        self.plan = plan_capture(opts.capture, self.device, facts, language)
        self.model = self.task.build_model(self.cfg.model)  # kept for the worker's life: each round loads into it
        problems = refusals(self.model) if self.cfg.worker_dp else []
        if problems:  # before registering: nothing written
            raise ConfigError(f"worker_dp: Opacus cannot train model {self.cfg.model} privately: {problems[0]}")
        self.captured: torch.nn.Module | None = None
        self.data = WorkerData(share, self.task, self.cfg, self.device)
        self.feedback = ErrorFeedback(residual_dir(), manifest.run_id, name, log)  # compression's residuals
        self.server: Server | None = None
        if opts.serve:
            self.server = Server(share, name, identity, self.task, record, manifest.run_id, self.model,
                                 Device(self.device, self.precision, self._settings(1, None).channels_last,
                                        self.cfg.eval_batch_size), log, self.heartbeat.note)

    def run(self) -> FinalMarker | None:
        # the data is checked before the first change to the share: a failed start leaves it as it was
        train = self.data.load(self.opts.data_root or self.cfg.data_root,
                               self.cfg.data_options(self.log, self.opts.memory_budget))
        if self.data.own is not None:  # a private task: registered by count, never sent
            self.heartbeat.info = replace(self.heartbeat.info, own_samples=len(self.data.own))
        own = {names.update_tensors_name(self.name), names.update_tensors_name(self.name, sealed=True),
               names.update_marker_name(self.name)}
        for r in self.share.rounds():
            self.share.remove_temporaries(self.share.updates_dir(r), own)  # left by a crash of this worker
        # and its heartbeat's, killed mid-write with it (before this process's heartbeat writes again)
        self.share.remove_temporaries(names.WORKERS, {self.name + names.MARKER_SUFFIX})
        if self.server is not None:
            self.server.sweep()
        self._warm_up(train)
        if self.cfg.balance == "throughput":  # the first round is sized by it; later rounds by measured rounds
            sample = first(train, 16 * self.cfg.batch_size)  # enough batches to time, little to copy
            speed = measure_throughput(self.model, sample, self._settings(self.cfg.local_epochs, None), self.device,
                                       captured=self.captured)
            self.heartbeat.info = replace(self.heartbeat.info, samples_per_s=round(speed, 1))
        if self.server is not None:  # jobs are first routed by it (prompts: by the chunks it runs); then by each chunk
            speed = None if self.task.tokenizer is not None else round(measure_inference(
                self.model, self.task.input_shape, self.cfg.eval_batch_size, self.device, self.precision), 1)
            self.heartbeat.info = replace(self.heartbeat.info, serves=True, infer_samples_per_s=speed)
        self.heartbeat.start()
        self.log(f"watching the share by {self.watcher.describe}")
        speed_note = f", {self._speed(self.heartbeat.info.samples_per_s)}" if self.heartbeat.info.samples_per_s else ""
        self.log(f"registered for run {self.manifest.run_id} on {self.device} "
                 f"({self.heartbeat.info.device_name}, {self.precision}{speed_note}); "
                 f"{len(train)} training examples{' of its own' if self.data.own is not None else ''}")
        said_final: int | None = None
        try:
            while True:
                try:
                    self.notices.check()
                    final = finished(self.share, self.manifest.run_id, self.coordinator_key)
                    if final is not None and final.round != said_final:
                        said_final = final.round
                        serving = "; serving inference jobs until stopped (Ctrl-C or SIGTERM)" if self.server else ""
                        self.log(f"run finished after round {final.round} (test accuracy "
                                 f"{final.test_accuracy:.4f}){serving}")
                    if final is not None and self.server is None:
                        return final
                    open_round = self._open_round() if final is None else None
                    if open_round is not None and self.secure is not None and self.secure.advance(*open_round):
                        continue  # a secure-aggregation step other than training: keys, envelopes, reveal
                    work = self._pending_round(open_round)  # training comes first
                    if work is not None:
                        self._train_round(*work)
                        continue
                    if self.server is not None and self.server.serve():
                        self.backoff.reset()
                        continue
                except OSError as e:
                    self.watcher.wait(self.backoff.failed(e, "looking for work"))
                    continue
                self.watcher.wait(self.opts.rescan)
        finally:
            self.heartbeat.stop()

    def _open_round(self) -> tuple[int, Assignment] | None:
        """The newest open round that gives this worker a task. A round folder whose assignment the coordinator did
        not sign is passed over (said once), so a forged later round cannot hide the real one."""
        for r in reversed(self.share.rounds()):
            if self.share.exists(self.share.summary(r)):
                return None  # the newest closed round: nothing before it is open
            try:
                a = self.share.read_record(Assignment, self.share.assignment(r))
            except Exception:  # noqa: BLE001 - not written or not synced whole yet
                return None
            if not verify(self.coordinator_key, assignment_message(a), a.signature):
                if (r, a.signature) not in self.refused:
                    self.refused.add((r, a.signature))
                    self.log(f"round {r}: WARNING: assignment.yaml is not signed by the run's coordinator (key "
                             f"{fingerprint(self.coordinator_key)}): someone else wrote it; not training on it")
                continue
            if a.run_id != self.manifest.run_id or self.name not in a.workers:
                return None
            return r, a
        return None

    def _pending_round(self, work: tuple[int, Assignment] | None) -> tuple[int, Assignment] | None:
        """The open round `work`, if this worker has not submitted it yet (with secure aggregation: once roster 2
        names it)."""
        if work is None or self._submitted(*work):
            return None
        if self.secure is not None and not self.secure.may_train(work[0]):
            return None
        return work

    def _submitted(self, r: int, a: Assignment) -> bool:
        """Whether this worker's own update marker for the round exists (also after a restart). A marker under its
        name that it did not sign is someone else's: said, and replaced by training the round."""
        name = self.share.update_marker(r, self.name)
        if not self.share.exists(name):
            return False
        try:
            m = self.share.read_record(UpdateMarker, name)
            own = (m.round == r and m.worker == self.name and m.base == a.model.blake3
                   and verify(self.identity.public, update_message(self.manifest.run_id, m), m.signature))
        except Exception:  # noqa: BLE001 - unreadable or malformed: not what this worker writes
            own = False
        if not own:
            self.log(f"round {r}: WARNING: updates/{names.basename(name)} is not this worker's (its signature does "
                     "not verify with this worker's key): training the round and replacing it")
        return own

    def _train_round(self, r: int, a: Assignment) -> None:
        seen = time.monotonic()
        task = a.workers[self.name]
        try:
            base = load_verified(self.share, self.share.global_model(r), a.model)
            shard, held_out = self.data.on_device(a.shards, task.shard)
        except Unusable as e:
            self.log(f"round {r}: its files are not usable yet ({e.detail}); waiting")
            self.watcher.wait(self.opts.rescan)
            return
        self.heartbeat.update(state="training", round=r)
        self.model.load_state_dict(base)  # in place: a captured step keeps using the same tensors
        ready = time.monotonic()
        evaluation = self._evaluate(held_out)
        evaluated = time.monotonic()
        settings = self._settings(task.local_epochs, task.local_steps)
        report = self._progress(r)
        seed = _seed(self.cfg.seed, r, self.name)
        worker_dp = self.cfg.worker_dp
        if worker_dp is not None and self.budget is not None:
            self.budget.check(len(shard))
            result, _ = dp_local_train(self.model, shard, settings, worker_dp.noise_multiplier,
                                       worker_dp.max_grad_norm, self.device, seed)
        else:
            result = local_train(self.model, shard, settings, self.device, seed=seed, captured=self.captured,
                                 report=report)
        trained = time.monotonic()
        if report is not None:
            report(0, 0, 0.0, 0.0)  # done: the progress line goes
        update = delta(self.model.state_dict(), base)
        diverged = _divergence(result.train_loss, update)
        ref, heads = None, []
        if diverged is None:
            if self.secure is not None:  # secure aggregation: the masked input, never the update itself
                written, _ = self.secure.masked_input(r, a, update, layout_of(base), result.samples)
                sealing = None
            else:
                written = encoded_update(r, update, self.cfg.compression,
                                         self.feedback if self.cfg.error_feedback else None)
                sealing = self._sealing(heads) if self.recipient else None
            name = self.share.update_tensors(r, self.name, sealed=sealing is not None)
            ref = self.backoff.run(lambda: save_state(self.share.write, name, written, seal=sealing),
                                   f"writing the update for round {r}")
            crash_point(f"worker:after-tensors:{r}")
        else:
            self.log(f"round {r}: WARNING: training diverged ({diverged}); not uploading the update: the run "
                     "needs a lower lr")
        signed = time.monotonic()
        timings = {"prepare_s": ready - seen, "evaluate_s": evaluated - ready, "train_s": trained - evaluated,
                   "publish_s": signed - trained}
        marker = UpdateMarker(format=FORMAT_VERSION, round=r, worker=self.name, base=a.model.blake3, tensors=ref,
                              samples=result.samples, steps=result.steps, train_loss=result.train_loss,
                              seconds=round(signed - seen, 3), device=self.device, diverged=diverged,
                              evaluation=evaluation, timings={k: round(v, 4) for k, v in timings.items()},
                              encoding=ENCODING if self.secure else self.cfg.compression,
                              encryption=SCHEME if self.recipient and not self.secure else "none",
                              sealed_head=heads[-1] if heads else None,
                              worker_epsilon=self.budget.after(r, result.samples, result.steps)
                              if self.budget is not None and ref is not None else None)
        marker.signature = self.identity.sign(update_message(self.manifest.run_id, marker))
        self.backoff.run(lambda: self.share.write_yaml(self.share.update_marker(r, self.name), to_dict(marker)),
                         f"writing the marker for round {r}")  # last: the update counts from here
        crash_point(f"worker:after-marker:{r}")
        written = time.monotonic()
        if self.nudge:
            self.nudge.scan(self.share.updates_dir(r))
        self.heartbeat.update(state="idle", round=r, samples_per_s=round(result.samples_per_s, 1),
                              sent_bytes=self.heartbeat.info.sent_bytes + (ref.bytes if ref else 0))
        held = (f"; the round's model on {evaluation.samples} held-out examples: accuracy "
                f"{evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}") if evaluation else ""
        what = "its own data" if task.shard is None else f"shard {task.shard}/{a.num_shards}"
        self.log(f"round {r}: trained {what} ({result.steps} steps over "
                 f"{result.samples} examples, {self._speed(result.samples_per_s)}) in {trained - evaluated:.2f} s, "
                 f"train loss {result.train_loss:.4f}{held}; assignment to training {ready - seen:.2f} s, training "
                 f"to marker written {written - trained:.2f} s")

    def _progress(self, r: int) -> Report | None:
        """On a terminal, round r's training in one line as it goes: steps, loss, speed, time left."""
        log = self.log
        if not isinstance(log, Logger) or not log.live:
            return None
        batch = self.cfg.batch_size

        def show(step: int, total: int, loss: float, rate: float) -> None:
            left = (total - step) * batch / rate if rate > 0 else 0.0
            log.progress(f"round {r}: step {step}/{total}, loss {loss:.4f}, {rate:.0f} samples/s, ~{left:.0f} s left"
                         if total else "")

        return show

    def _warm_up(self, train: Source) -> None:
        """A few training steps on the first examples before registering, so round 1 runs at full speed: the first
        call of every kernel, and the capture of the step in CUDA graphs (compiled once for this process, timed and
        said). A capture that fails falls back to eager, said with its reason. The weights are overwritten by each
        round's global model."""
        self.log(self.plan.why if self.cfg.worker_dp is None else "worker_dp: training eagerly (Opacus's per-example "
                 "gradients are not captured in CUDA graphs)")
        sample, settings = first(train, 3 * self.cfg.batch_size), self._settings(1, 3)
        if self.plan.capture and self.cfg.worker_dp is None:
            started = time.monotonic()
            self.log("compiling the training step (once per process; round 1 waits for it)")
            try:
                self.captured = capture(self.model)
                local_train(self.model, sample, settings, self.device, seed=0, captured=self.captured)
                seconds = time.monotonic() - started
                self.log(f"training step compiled and captured in {seconds:.1f} s")
                self.heartbeat.info = replace(self.heartbeat.info, training_step="cuda-graphs",
                                              compile_s=round(seconds, 3))
                return
            except Exception as e:  # noqa: BLE001 - whatever the compiler raises, eager still trains
                self.captured = None
                self.log(f"WARNING: capturing the training step failed ({type(e).__name__}: {e}); training eagerly")
        local_train(self.model, sample, settings, self.device, seed=0)

    def _sealing(self, heads: list[str]) -> Callable[[bytes], bytes]:
        """Seals an update to the coordinator, keeping the sealed file's head hash for the marker."""
        def sealed(data: bytes) -> bytes:
            out = seal(data, self.recipient)  # type: ignore[arg-type]
            heads.append(sealed_head(out))
            return out
        return sealed

    def _speed(self, samples_per_s: float) -> str:
        """A training speed as people compare it: a language model's in tokens (max_length positions an example)."""
        if self.task.tokenizer is not None:
            return f"{samples_per_s * self.task.input_shape[0]:.0f} tokens/s"
        return f"{samples_per_s:.0f} samples/s"

    def _settings(self, epochs: int, steps: int | None) -> TrainSettings:
        return TrainSettings(epochs=epochs, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                             momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay,
                             augment=self.task.augmentation(self.cfg.augment),
                             steps=steps, prox_mu=self.cfg.prox_mu, precision=self.precision,
                             channels_last=self.device.startswith("cuda") and len(self.task.input_shape) == 3)

    def _evaluate(self, held_out: Source) -> HeldOut | None:
        """Federated evaluation: the round's global model (just loaded) on this worker's held-out examples."""
        if not len(held_out):
            return None
        loss, accuracy = evaluate(self.model, held_out, self.cfg.eval_batch_size, self.device)
        return HeldOut(loss=loss, accuracy=accuracy, samples=len(held_out))


def _divergence(train_loss: float, update: dict[str, torch.Tensor]) -> str | None:
    """Why an update is garbage (a non-finite loss, NaN or infinite values), or None when it is not."""
    bad = [k for k, v in update.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if math.isfinite(train_loss) and not bad:
        return None
    values = f"NaN or infinite values in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}" if bad else ""
    return "; ".join(x for x in (f"train loss {train_loss}" if not math.isfinite(train_loss) else "", values) if x)


def _seed(seed: int, r: int, name: str) -> int:
    """A per-round, per-worker seed that every platform derives the same way."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{r}/{name}".encode()).digest()[:4], "little")
