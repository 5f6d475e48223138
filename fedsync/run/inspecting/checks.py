"""The checker behind `fedsync verify`: re-check every marker and hash a run relies on, like `restic check`.

Errors are damage to what the run's decisions rest on (a global model, an accepted update, an aggregate, the
final model); hints are harmless leftovers. Every finding names its file and what fixes it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from fedsync.base.errors import TrustError
from fedsync.run.trust import read_trust
from fedsync.storage import names
from fedsync.storage.jobfiles import list_jobs
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import (
    Assignment,
    CoordinatorLease,
    FileRef,
    FinalMarker,
    JobMarker,
    JobPlan,
    OutputMarker,
    Summary,
    UpdateMarker,
    WorkerInfo,
)
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.sealing import SCHEME, SealedReader, SealingIdentity
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, final_message
from fedsync.storage.signing import verify as verify_signature
from fedsync.storage.store import read_exact
from fedsync.storage.tensorfile import SCALE_SUFFIX, read_header
from fedsync.storage.yamlfile import MAX_YAML_BYTES


@dataclass(frozen=True)
class Finding:
    level: str  # error | hint
    path: str
    problem: str
    fix: str


@dataclass
class Report:
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    pruned_through: int = 0  # keep_rounds: tensors of rounds up to this one may be gone on purpose
    pruned: int = 0          # tensor files found removed so
    verified: set[tuple[str, str]] = field(default_factory=set)  # (file, hash) checked already: said once
    opener: SealingIdentity | None = None  # opens sealed updates: their plaintext is checked too

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]


RESTORE = "restore it from a backup or a sync peer; rounds after it cannot be re-derived without it"


def verify(share: Share, opener: SealingIdentity | None = None) -> Report:
    """Every check of docs/PROTOCOL.md section 9; with `opener` (the coordinator's age identity) every accepted
    sealed update is opened too."""
    report = Report(opener=opener)
    manifest = read_manifest(share)  # a missing or foreign-format manifest is an error the caller reports
    report.checked += 1
    keep, closed_rounds = manifest.config.get("keep_rounds"), share.closed_rounds()
    if isinstance(keep, int) and closed_rounds:
        report.pruned_through = closed_rounds[-1] - keep
    key = manifest.coordinator_key
    if share.exists(share.trust):
        report.checked += 1
        try:
            read_trust(share, manifest.run_id, key)
        except TrustError as e:
            report.findings.append(Finding("error", share.trust, str(e), "the coordinator refuses to start on it"))
    _record(report, share, share.lease, CoordinatorLease, required=False,
            fix="the coordinator rewrites it at its next start")
    for e in sorted(share.list(share.workers_dir), key=lambda e: e.name):
        if e.name.endswith(names.MARKER_SUFFIX) and not e.name.startswith("."):
            _record(report, share, names.join(share.workers_dir, e.name), WorkerInfo, required=True, level="hint",
                    fix="the worker rewrites it at its next heartbeat; restart that worker")
    closed = 0
    ended = _budget_end(share)
    for r in share.rounds():
        a = _record(report, share, share.assignment(r), Assignment, required=r != ended + 1,
                    fix="the round was never opened whole; delete its folder if it holds nothing else")
        if a is not None:
            _signed(report, share.assignment(r), verify_signature(key, assignment_message(a), a.signature))
            _file(report, share, share.global_model(r), a.model, f"round {r}'s global model: {RESTORE}",
                  pruned=r <= report.pruned_through)
        s = _record(report, share, share.summary(r), Summary, required=False, fix=RESTORE)
        if s is not None:
            closed = r
            aggregate = s.model.file
            if aggregate == share.final_model and share.exists(share.round_dir(r + 1)):
                aggregate = share.global_model(r + 1)  # a finished run, continued: its aggregate went on from there
            _file(report, share, aggregate, s.model, f"round {r}'s aggregate: {RESTORE}",
                  pruned=r + 1 <= report.pruned_through and aggregate == share.global_model(r + 1))
            if s.server_state is not None:  # the last closed round's is never pruned: the run goes on from it
                _file(report, share, share.server_state(r), s.server_state,
                      f"the server optimizer's state after round {r}: {RESTORE}", pruned=r <= report.pruned_through)
            for x in s.accepted:
                _update(report, share, r, x.worker, f"accepted in round {r}")
            for late in s.late:
                if late.outcome == "folded":
                    _update(report, share, late.round, late.worker, f"folded into round {r}")
        _leftovers(report, share, share.round_dir(r), recursive=True)
    _leftovers(report, share, "", recursive=False)
    if closed:
        _metrics(report, share, closed)
    for job in list_jobs(share):
        _job(report, share, job)
    final = _record(report, share, share.final_marker, FinalMarker, required=False, fix=RESTORE)
    if final is not None:
        _signed(report, share.final_marker, verify_signature(key, final_message(final), final.signature))
        _file(report, share, share.final_model, final.model, f"the final model: {RESTORE}")
    return report


def _budget_end(share: Share) -> int:
    """The round a run ended after at its privacy budget (its next round's folder holds only that round's aggregate,
    never opened: docs/PROTOCOL.md section 5.8); -1 when it did not end so."""
    try:
        final = share.read_record(FinalMarker, share.final_marker)
    except Exception:  # noqa: BLE001 - absent or unreadable: reported by the final check below
        return -1
    return final.round if final.stopped_because is not None else -1


def _job(report: Report, share: Share, job: str) -> None:
    """An inference job: its model, every chunk, and every output its plan took (signatures were checked by the
    submitter when it took them, as updates' by the coordinator)."""
    marker = _record(report, share, names.job_marker(job), JobMarker, required=True, level="hint",
                     fix="the job was never submitted whole: run the same `fedsync infer` again, or delete its folder")
    if marker is None:
        return
    folder = names.job_dir(job)
    redo = "run the same `fedsync infer` again after deleting the job's folder: the job is rewritten from its inputs"
    _file(report, share, names.job_model(job), marker.model, f"job {job}'s model: {redo}")
    for chunk in marker.chunks:
        _file(report, share, names.join(folder, chunk.file), chunk, f"job {job}'s inputs: {redo}")
    plan = _record(report, share, names.job_plan(job), JobPlan, required=True, level="hint",
                   fix="the submitter writes it: run the same `fedsync infer` again to continue the job")
    for worker, chunks in (plan.accepted.items() if plan else ()):
        for c in chunks:
            m = _record(report, share, names.output_marker(job, c, worker), OutputMarker, required=True,
                        fix=f"job {job} took this output; run the same `fedsync infer` again to predict chunk {c} anew")
            if m is not None and m.outputs is not None:
                _file(report, share, names.join(names.outputs_dir(job), m.outputs.file), m.outputs,
                      f"job {job} took this output and it changed since; the same `fedsync infer` predicts chunk "
                      f"{c} anew")
    _leftovers(report, share, folder, recursive=True)


def _signed(report: Report, name: str, valid: bool) -> None:
    if not valid:
        report.findings.append(Finding("error", name, "not signed by the run's coordinator key (fedsync.yaml)",
                                       f"someone else wrote it: {RESTORE}"))


def _record(report: Report, share: Share, name: str, cls: type, required: bool, fix: str,
            level: str = "error"):  # type: ignore[no-untyped-def]
    if not share.exists(name):
        if required:
            report.findings.append(Finding(level, name, "missing", fix))
        return None
    report.checked += 1
    try:
        return share.read_record(cls, name)
    except Exception as e:  # noqa: BLE001 - any unreadable marker is one finding
        report.findings.append(Finding(level, name, f"unreadable: {e}", fix))
        return None


def _file(report: Report, share: Share, name: str, ref: FileRef, fix: str, pruned: bool = False) -> None:
    """Check a file against its reference; one that keep_rounds removed (`pruned`) is counted, not a finding."""
    if pruned and not share.exists(name):
        report.pruned += 1
        return
    if (name, ref.blake3) in report.verified:  # a round's aggregate is the next round's global model
        return
    report.verified.add((name, ref.blake3))
    report.checked += 1
    try:
        share.read_verified(name, ref)
    except Unusable as e:
        problem = "missing" if e.reason == Reason.MISSING_FILE else f"{e.reason.value}: {e.detail}"
        report.findings.append(Finding("error", name, problem, fix))
    except OSError as e:
        report.findings.append(Finding("error", name, f"unreadable: {e.strerror or e}", fix))


def _update(report: Report, share: Share, r: int, worker: str, why: str) -> None:
    m = _record(report, share, share.update_marker(r, worker), UpdateMarker, required=True,
                fix=f"the update was {why}; {RESTORE}")
    if m is not None and m.tensors is None:
        report.findings.append(Finding("error", share.update_marker(r, worker), "names no tensors",
                                       f"the update was {why}; {RESTORE}"))
    elif m is not None:
        name = share.update_tensors(r, worker, sealed=m.encryption == SCHEME)
        _file(report, share, name, m.tensors, f"the update was {why}; {RESTORE}", pruned=r <= report.pruned_through)
        if m.encryption == SCHEME and report.opener is not None and share.exists(name):
            _plaintext(report, share, name, r)


def _plaintext(report: Report, share: Share, name: str, r: int) -> None:
    """Open a sealed update with the coordinator's key: every chunk must verify, and the plaintext must be a
    safetensors file with the round's global model's tensors (int8's added scales aside)."""
    assert report.opener is not None
    fix = "the coordinator could not have counted it: restore it from a backup, or check --key is the run's"
    try:
        with share.store.open(share.global_model(r), follow_links=False) as f:
            expected = {spec.name for spec in read_header(f)[1]}
        with share.store.open(name, follow_links=False) as f:
            plain = SealedReader(f, report.opener).start()
            found = {spec.name for spec in read_header(plain)[1]}
            piece = memoryview(bytearray(1 << 20))
            while left := plain.size - plain.tell():  # every chunk decrypted: each tag checked
                read_exact(plain, piece[:min(len(piece), left)])
    except FileNotFoundError:
        return  # the global model was pruned or is missing: reported on its own
    except Unusable as e:
        report.findings.append(Finding("error", name, f"{e.reason.value}: {e.detail}", fix))
        return
    except OSError as e:
        report.findings.append(Finding("error", name, f"unreadable: {e.strerror or e}", fix))
        return
    values = {n for n in found if not n.endswith(SCALE_SUFFIX)}
    if values != expected:
        missing, extra = sorted(expected - values), sorted(values - expected)
        report.findings.append(Finding("error", name, f"its plaintext holds other tensors than the global model "
                                                      f"(missing {missing[:3]}, extra {extra[:3]})", fix))


def _leftovers(report: Report, share: Share, folder: str, recursive: bool) -> None:
    for e in share.list(folder):
        name = names.join(folder, e.name)
        if e.name.startswith(".") and e.name.endswith(".tmp"):
            report.findings.append(Finding("hint", name, "temporary file left by an interrupted writer",
                                           "harmless; its owner deletes it at its next start, or delete it"))
        elif names.is_conflict_copy(e.name):
            report.findings.append(Finding("hint", name, "sync conflict copy",
                                           "two machines wrote one file; fedsync never reads it: delete it"))
        if e.folder and recursive:
            _leftovers(report, share, name, recursive)


def _metrics(report: Report, share: Share, closed: int) -> None:
    report.checked += 1
    try:
        text = share.store.read(share.metrics, 16 * MAX_YAML_BYTES).decode()
        rounds = [int(row["round"]) for row in csv.DictReader(io.StringIO(text))]
    except (OSError, KeyError, ValueError):
        rounds = []
    if rounds != list(range(1, closed + 1)):
        report.findings.append(Finding("hint", share.metrics, f"does not list rounds 1..{closed}",
                                       "derived from the summaries: the coordinator rewrites it at its next start"))
