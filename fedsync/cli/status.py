"""Where a run stands, read from the share alone: what `fedsync status` prints (or emits as JSON)."""

from __future__ import annotations

import os
import time
from typing import Any

from fedsync.storage.lease import LEASE_FILE
from fedsync.storage.manifest import finished, read_manifest
from fedsync.storage.markers import Assignment, CoordinatorLease, Summary, WorkerInfo, parse
from fedsync.storage.share import Share, is_conflict_copy, is_temporary, read_yaml


def _load(cls: type, path: os.PathLike[str] | str, where: str) -> Any:
    try:
        return parse(cls, read_yaml(path), where)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - absent, or not synced whole yet: status reports what it can
        return None


def collect_status(share: Share) -> dict[str, Any]:
    manifest = read_manifest(share)
    rounds = share.rounds()
    current = rounds[-1] if rounds else None
    status: dict[str, Any] = {
        "share": str(share.root), "run_id": manifest.run_id, "created": manifest.created,
        "task": manifest.config["task"], "model": manifest.config["model"],
        "round": current, "rounds": None, "state": "waiting for workers", "assigned": [], "submitted": [],
        "last_closed": None, "workers": [], "final": None, "coordinator": None,
    }
    if current is not None:
        a: Assignment | None = _load(Assignment, share.assignment(current), "assignment")
        if a is not None:
            status["rounds"] = a.rounds
            status["assigned"] = sorted(a.workers)
            status["state"] = "collecting updates"
        try:
            status["submitted"] = sorted(n[:-5] for n in os.listdir(share.updates_dir(current))
                                         if n.endswith(".yaml") and not is_temporary(n) and not is_conflict_copy(n))
        except FileNotFoundError:
            pass
        closed = share.closed_rounds()
        if closed:
            s: Summary | None = _load(Summary, share.summary(closed[-1]), "summary")
            if s is not None:
                status["last_closed"] = {
                    "round": s.round, "closed_because": s.closed_because, "seconds": s.seconds,
                    "accepted": [x.worker for x in s.accepted],
                    "rejected": [{"worker": x.worker, "reason": x.reason, "detail": x.detail} for x in s.rejected],
                    "missing": s.missing, **s.metrics}
            if closed[-1] == current:
                status["state"] = "closed; next round not open yet"
    lease: CoordinatorLease | None = _load(CoordinatorLease, share.root / LEASE_FILE, LEASE_FILE)
    if lease is not None:
        try:
            age: float | None = round(time.time() - os.stat(share.root / LEASE_FILE).st_mtime, 1)
        except FileNotFoundError:
            age = None
        status["coordinator"] = {"owner": lease.owner, "host": lease.host, "pid": lease.pid, "state": lease.state,
                                 "round": lease.round, "note": lease.note, "last_refresh_s": age}
        if lease.state == "extended":
            status["state"] = f"extended: {lease.note}"
    final = finished(share, manifest.run_id)
    if final is not None:
        status["final"] = {"round": final.round, "test_accuracy": final.test_accuracy}
        status["state"] = "finished"
    now = time.time()
    try:
        names = sorted(n[:-5] for n in os.listdir(share.workers_dir)
                       if n.endswith(".yaml") and not is_temporary(n) and not is_conflict_copy(n))
    except FileNotFoundError:
        names = []
    for name in names:
        info: WorkerInfo | None = _load(WorkerInfo, share.worker_file(name), "worker")
        if info is None:
            status["workers"].append({"name": name, "problem": "registration unreadable"})
            continue
        try:
            age = now - os.stat(share.worker_file(name)).st_mtime
        except FileNotFoundError:
            age = None
        status["workers"].append({
            "name": name, "device": info.device, "device_name": info.device_name, "torch": info.torch,
            "cuda_capability": info.cuda_capability, "precision": info.precision,
            "samples_per_s": info.samples_per_s, "device_fallback": info.device_fallback, "state": info.state,
            "round": info.round, "last_heartbeat_s": None if age is None else round(age, 1)})
    return status


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['run_id']} ({st['task']}/{st['model']}) in {st['share']}",
             f"round {st['round'] or '-'} of {st['rounds'] or '-'}: {st['state']}"]
    if st["assigned"]:
        lines.append(f"  assigned: {', '.join(st['assigned'])}; submitted: {', '.join(st['submitted']) or 'none'}")
    last = st["last_closed"]
    if last:
        lines.append(f"last closed round {last['round']} ({last['closed_because']}, {last['seconds']} s): "
                     f"test accuracy {last['test_accuracy']:.4f}, test loss {last['test_loss']:.4f}, "
                     f"{len(last['accepted'])} accepted, {len(last['rejected'])} rejected, "
                     f"{len(last['missing'])} missing")
        for r in last["rejected"]:
            lines.append(f"  rejected {r['worker']}: {r['reason']} ({r['detail']})")
    if st["final"]:
        lines.append(f"finished after round {st['final']['round']}: test accuracy "
                     f"{st['final']['test_accuracy']:.4f}")
    c = st["coordinator"]
    if c:
        lines.append(f"coordinator {c['owner']}: {c['state']}, lease refreshed {c['last_refresh_s']} s ago "
                     "(file time, as seen from here)")
    lines.append(f"workers ({len(st['workers'])}):")
    for w in st["workers"]:
        if "problem" in w:
            lines.append(f"  {w['name']}: {w['problem']}")
            continue
        cap = f", sm {w['cuda_capability']}" if w["cuda_capability"] else ""
        speed = f", {w['samples_per_s']:.0f} samples/s" if w["samples_per_s"] else ""
        lines.append(f"  {w['name']}: {w['state']}, {w['device']} ({w['device_name']}{cap}, {w['precision']}{speed}), "
                     f"torch {w['torch']}, heartbeat {w['last_heartbeat_s']} s ago (file time, as seen from here)")
        if w["device_fallback"]:
            lines.append(f"    WARNING: on the CPU although a GPU is present: {w['device_fallback']}")
    return "\n".join(lines)
