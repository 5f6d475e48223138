"""What a restarted coordinator re-derives from the share before it goes on (docs/DESIGN.md, invariant 6): its
own temporary files a crash left, metrics.csv's rows, the evaluations a crash cut short, the server optimizer's
state after the last closed round, and the assignment of a round it had opened."""

from __future__ import annotations

import torch

from fedsync.aggregation.optimizers import ServerOptimizer
from fedsync.base.errors import ShareError
from fedsync.base.logs import Log
from fedsync.run.coordinating.evaluation import due
from fedsync.run.coordinating.ledger import load_summary
from fedsync.run.coordinating.report import Metrics
from fedsync.storage import names
from fedsync.storage.keys import Identity
from fedsync.storage.markers import Assignment, Evaluation, FileRef, MarkerError, Summary
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, verify
from fedsync.tensors.files import load_verified


def remove_stale_temporaries(share: Share) -> int:
    """Temporary files of the coordinator's own files, left by a crash (readers skip them anyway); how many."""
    removed = share.remove_temporaries("", set(names.COORDINATOR_ROOT_FILES))
    for r in share.rounds():
        removed += share.remove_temporaries(share.round_dir(r), set(names.COORDINATOR_ROUND_FILES))
    return removed


def replay(share: Share, closed: list[int], metrics: Metrics, rounds: int,
           eval_every: int) -> list[tuple[int, FileRef]]:
    """metrics.csv's rows of the closed rounds, from their summaries and evaluations; the rounds whose evaluation is
    due but was cut short, with their models, to evaluate now."""
    unevaluated = []
    for r in closed:
        summary = load_summary(share, r)
        metrics.closed(summary)
        if share.exists(share.evaluation(r)):
            metrics.evaluated(share.read_record(Evaluation, share.evaluation(r)))
        elif due(r, rounds, eval_every):
            unevaluated.append((r, summary.model))
    return unevaluated


def saved_server_state(share: Share, optimizer: ServerOptimizer, summary: Summary) -> dict[str, torch.Tensor]:
    """The optimizer's state after a closed round, read back (verified) to go on exactly from it."""
    if not optimizer.stateful:
        return {}
    if summary.server_state is None:
        raise ShareError(f"round {summary.round}'s summary names no {names.SERVER_STATE}, but the run's "
                         f"server_optimizer {optimizer.name} keeps state: the share was edited")
    try:
        return load_verified(share, share.server_state(summary.round), summary.server_state)
    except Unusable as e:
        raise ShareError(f"{share.where(share.server_state(summary.round))} cannot be used ({e.detail}); "
                         "the run cannot continue exactly without it") from None


def own_assignment(share: Share, r: int, identity: Identity, log: Log) -> Assignment | None:
    """Round r's assignment if this coordinator wrote it (a restart); None, said, when someone else did: the round
    is opened again over it, and workers never trained on it (they check the signature)."""
    try:
        a = share.read_record(Assignment, share.assignment(r))
        if verify(identity.public, assignment_message(a), a.signature):
            return a
        why = "it is not signed by this coordinator"
    except MarkerError as e:
        why = str(e)
    log(f"round {r}: WARNING: {share.where(share.assignment(r))} was not written by this coordinator ({why}): "
        "opening the round over it")
    return None
