"""Where a run stands, read from the share alone: the record `fedsync status` prints (or emits as JSON) and its live
view redraws. YAML and hashes only."""

from __future__ import annotations

import time
from typing import Any

from fedsync.base.errors import TrustError
from fedsync.run.trust import read_trust, trust_state
from fedsync.storage import names
from fedsync.storage.jobfiles import list_jobs, read_plan
from fedsync.storage.lease import read_lease
from fedsync.storage.manifest import finished, read_manifest
from fedsync.storage.markers import (
    Assignment,
    CoordinatorLease,
    Evaluation,
    JobMarker,
    Summary,
    TrustedKey,
    WorkerInfo,
)
from fedsync.storage.share import Share
from fedsync.storage.signing import fingerprint


def _load(share: Share, cls: type, name: str) -> Any:
    try:
        return share.read_record(cls, name)
    except Exception:  # noqa: BLE001 - absent, or not synced whole yet: status reports what it can
        return None


def _markers(share: Share, folder: str) -> dict[str, float]:
    """Marker files in a folder by owner, with their modification times (file time, as seen from here)."""
    found = {owner: e.modified for e in share.list(folder) if (owner := names.marker_owner(e.name)) is not None}
    return dict(sorted(found.items()))


def _modified(share: Share, folder: str, name: str) -> float | None:
    """A file's modification time (file time, as seen from here), or None when it is absent."""
    return {e.name: e.modified for e in share.list(folder)}.get(name)


def collect_status(share: Share) -> dict[str, Any]:
    manifest = read_manifest(share)
    rounds = share.rounds()
    current = rounds[-1] if rounds else None
    status: dict[str, Any] = {
        "share": share.where(), "run_id": manifest.run_id, "created": manifest.created,
        "task": manifest.config["task"], "model": manifest.config["model"],
        "round": current, "rounds": None, "state": "waiting for workers", "assigned": [], "submitted": [],
        "last_closed": None, "rejected_open_round": [], "workers": [], "final": None, "coordinator": None,
        "keep_rounds": manifest.config.get("keep_rounds"), "tensors_removed_through": None,
        "accepted_open_round": [], "quorum": None, "deadline_in_s": None,
    }
    if current is not None:
        _rounds(share, current, status)
    _coordinator(share, current, status)
    final = finished(share, manifest.run_id, manifest.coordinator_key)
    if final is not None and final.stopped_because is not None and current == final.round + 1:
        status["round"] = final.round  # ended at its privacy budget: the next round's folder was never opened
    if final is not None:
        status["final"] = {"round": final.round, "test_accuracy": final.test_accuracy,
                           "stopped_because": final.stopped_because, "epsilon": final.epsilon}
        status["state"] = "finished"
        status["rounds"] = status["rounds"] or final.round
    status["jobs"] = _jobs(share)
    status["coordinator_key"] = fingerprint(manifest.coordinator_key)
    status["sealed_to"] = manifest.recipient if manifest.config.get("confidential_updates") else None
    status["secure_aggregation"] = bool(manifest.config.get("secure_aggregation"))
    status["dp"] = manifest.config.get("dp")
    try:
        trusted = read_trust(share, manifest.run_id, manifest.coordinator_key)
    except TrustError as e:
        trusted, status["trust_problem"] = {}, str(e)
    tokens = manifest.config.get("max_length") if manifest.config["task"] == "causal_lm" else None
    status["workers"] = _workers(share, trusted, manifest.config.get("trust", "tofu"), tokens)
    return status


def _rounds(share: Share, current: int, status: dict[str, Any]) -> None:
    """The newest round (its assignment, the markers in), and the last closed one (its summary, its evaluation)."""
    a: Assignment | None = _load(share, Assignment, share.assignment(current))
    if a is not None:
        status["rounds"] = a.rounds
        status["assigned"] = sorted(a.workers)
        status["state"] = "collecting updates"
        opened = _modified(share, share.round_dir(current), names.ASSIGNMENT)
        if opened is not None:  # by the assignment's file time as seen from here: an estimate
            status["deadline_in_s"] = round(a.time_budget_s - (time.time() - opened), 1)
    status["submitted"] = list(_markers(share, share.updates_dir(current)))
    closed = share.closed_rounds()
    if closed and status["keep_rounds"] is not None and closed[-1] > status["keep_rounds"]:
        status["tensors_removed_through"] = closed[-1] - status["keep_rounds"]
    if not closed:
        return
    s: Summary | None = _load(share, Summary, share.summary(closed[-1]))
    if s is not None:
        status["last_closed"] = {
            "round": s.round, "closed_because": s.closed_because, "seconds": s.seconds,
            "accepted": [x.worker for x in s.accepted],
            "rejected": [{"worker": x.worker, "reason": x.reason, "detail": x.detail} for x in s.rejected],
            "missing": s.missing, **s.metrics, "test_accuracy": None, "test_loss": None,
            "evaluation": "pending",
            "privacy": {"epsilon": s.privacy.epsilon, "delta": s.privacy.delta, "noise": s.privacy.noise,
                        "noise_multiplier": s.privacy.noise_multiplier, "clip": s.privacy.clip}
            if s.privacy else None}
        ev: Evaluation | None = _load(share, Evaluation, share.evaluation(closed[-1]))
        if ev is not None:
            status["last_closed"].update(test_accuracy=ev.test_accuracy, test_loss=ev.test_loss,
                                         evaluation=f"{ev.samples} examples on {ev.device}, {ev.seconds} s")
    if closed[-1] == current:
        status["state"] = "closed; next round not open yet"


def _coordinator(share: Share, current: int | None, status: dict[str, Any]) -> None:
    """The coordinator's lease: who drives the run, and the open round's verdicts so far."""
    lease: CoordinatorLease | None = read_lease(share)
    if lease is None:
        return
    modified = _modified(share, "", share.lease)
    age: float | None = None if modified is None else round(time.time() - modified, 1)
    status["coordinator"] = {"owner": lease.owner, "host": lease.host, "pid": lease.pid, "state": lease.state,
                             "round": lease.round, "note": lease.note, "last_refresh_s": age}
    if lease.rounds is not None:  # what the coordinator drives to, also while no round is open
        status["rounds"] = lease.rounds
    if lease.state == "extended":
        status["state"] = f"extended: {lease.note}"
    elif lease.state == "waiting for workers" and lease.round == current and lease.note:
        status["state"] = f"waiting for workers: {lease.note}"
    elif lease.state == "stopped":
        status["state"] = f"the coordinator stopped: {lease.note}" if lease.note else "the coordinator stopped"
    if lease.round == current and current not in share.closed_rounds():
        status["rejected_open_round"] = [{"worker": x.worker, "reason": x.reason, "detail": x.detail}
                                         for x in lease.rejected]
        status["accepted_open_round"], status["quorum"] = lease.accepted, lease.quorum
    else:
        status["deadline_in_s"] = None  # no round is collecting


def _workers(share: Share, trusted: dict[str, TrustedKey], mode: str,
             tokens_per_example: int | None) -> list[dict[str, Any]]:
    """Each registration: device, speed, state, heartbeat age, key and whether it is trusted. A language model's
    speed is also in tokens: every example is max_length positions, so the samples per second that throughput
    balance divides the round by are that many tokens each."""
    workers: list[dict[str, Any]] = []
    now = time.time()
    for name, modified in _markers(share, share.workers_dir).items():
        info: WorkerInfo | None = _load(share, WorkerInfo, share.worker_file(name))
        if info is None:
            workers.append({"name": name, "problem": "registration unreadable"})
            continue
        age = now - modified
        workers.append({
            "name": name, "device": info.device, "device_name": info.device_name, "torch": info.torch,
            "cuda_capability": info.cuda_capability, "precision": info.precision,
            "samples_per_s": info.samples_per_s, "device_fallback": info.device_fallback, "state": info.state,
            "tokens_per_s": info.samples_per_s * tokens_per_example if info.samples_per_s and tokens_per_example
            else None,
            "training_step": info.training_step, "compile_s": info.compile_s, "own_samples": info.own_samples,
            "sent_bytes": info.sent_bytes, "serves": info.serves, "infer_samples_per_s": info.infer_samples_per_s,
            "round": info.round, "last_heartbeat_s": None if age is None else round(age, 1),
            "key": fingerprint(info.public_key) if info.public_key else None,
            "trust": _trust(name, info.public_key, trusted.get(name), mode, share.where())})
    return workers


def _jobs(share: Share) -> list[dict[str, Any]]:
    """Each inference job: its state and how far it got, by the submitter's plan."""
    jobs = []
    for name in list_jobs(share):
        job: JobMarker | None = _load(share, JobMarker, names.job_marker(name))
        plan = read_plan(share, name)
        if job is None:
            jobs.append({"name": name, "state": "being submitted"})
            continue
        done = sorted(c for cs in (plan.accepted.values() if plan else ()) for c in cs)
        jobs.append({"name": name, "state": plan.state if plan else "submitted", "model": job.model_source,
                     "inputs": job.inputs, "rows": job.rows, "chunks": len(job.chunks), "chunks_done": len(done),
                     "rows_done": sum(job.chunks[c].rows for c in done if c < len(job.chunks)),
                     "by_worker": {w: len(cs) for w, cs in sorted(plan.accepted.items())} if plan else {},
                     "queues": plan.queues if plan else {},
                     "problems": [{"chunk": x.chunk, "worker": x.worker, "reason": x.reason} for x in plan.problems]
                     if plan else [],
                     "plan_refreshed_s": None if plan is None or (m := _modified(share, names.job_dir(name),
                                                                                  names.JOB_PLAN)) is None
                     else round(time.time() - m, 1)})
    return jobs


def _trust(name: str, key: str | None, entry: TrustedKey | None, mode: str, where: str) -> str:
    """pinned | approved | new (pinned when first assigned) | why its updates do not count."""
    problem = trust_state(name, key, entry, mode, where)
    if problem is not None:
        return problem
    return entry.state if entry is not None else "new: its key is pinned when it is first assigned work"
