"""The test net, checked: break one line in a copy of fedsync, run the tests that guard that line against the
copy, and expect them to fail. A mutant that passes is a hole in the net. `python benchmarks/mutants.py` (or
`make mutants`) runs them all; tests/test_mutations.py keeps every mutant's line and tests in step with the
code in every `make test`.

Each mutant quotes the exact line it breaks, which must occur once in its file: when code moves, the suite
fails until the mutant moves with it, so the net cannot loosen unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATE_LEDGER = "tests/test_late.py::test_late_ledger_weighs_by_age_and_looks_back_max_staleness_rounds"
JUDGED = "tests/test_infer.py::test_an_output_counts_only_signed_whole_and_finite_and_the_first_one_wins"


@dataclass(frozen=True)
class Mutant:
    what: str
    file: str
    line: str
    becomes: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("the hash check is skipped", "fedsync/aggregation/intake.py",
           "if reading.hasher.hexdigest() != reading.expected:", "if False:",
           ("tests/test_intake.py::test_hash_mismatch_and_missing_file_waits",)),
    Mutant("the finite check is skipped", "fedsync/aggregation/intake.py",
           "if math.isnan(square):", "if False:",
           ("tests/test_intake.py::test_bad_file_is_rejected_with_its_reason",)),
    Mutant("the quorum target ignores the quorum", "fedsync/run/coordinating/intake.py",
           "wanted = min(quorum, live_assigned) if isinstance(quorum, int) else math.ceil(quorum * live_assigned)",
           "wanted = live_assigned",
           ("tests/test_quorum.py::test_quorum_target",)),
    Mutant("the coordinator waits for every live assigned worker", "fedsync/run/coordinating/intake.py",
           "if accepted >= target:", "if accepted >= len(live_assigned):",
           ("tests/test_quorum.py::test_quorum_closes_the_round_before_every_live_worker_reports[0.6-1]",)),
    Mutant("the staleness weight ignores the age", "fedsync/fedavg.py",
           "return samples * (1.0 + rounds_late) ** -exponent", "return samples * 2.0 ** -exponent",
           ("tests/test_late.py::test_staleness_weight",)),
    Mutant("every late update counts as one round late", "fedsync/run/coordinating/ledger.py",
           "weight = staleness_weight(cand.weight, self.r - c, self.cfg.staleness_exponent)",
           "weight = staleness_weight(cand.weight, 1, self.cfg.staleness_exponent)",
           (LATE_LEDGER,)),
    Mutant("max_staleness does not cut off", "fedsync/run/coordinating/ledger.py",
           "window = range(max(1, r - cfg.max_staleness), r)", "window = range(1, r)",
           (LATE_LEDGER,)),
    Mutant("a lease that is being refreshed is taken over", "fedsync/storage/watch.py",
           "if share.signature(name) != seen:", "if False:",
           ("tests/test_lease.py::test_lease_check_refuses_a_lease_that_is_being_refreshed",
            "tests/test_infer.py::test_a_plan_kept_fresh_by_another_hosts_submitter_is_refused_and_a_stale_one_taken_over")),
    Mutant("an update's signature is not checked", "fedsync/run/trust.py",
           "if verify(entry.key, update_message(self.run_id, m), m.signature):", "if True:",
           ("tests/test_trust.py::test_an_update_counts_only_when_signed_by_the_trusted_key_for_this_round",)),
    Mutant("the run is written before the data is checked", "fedsync/coordinator.py",
           "existing = check_run(share, opts.config)",
           "existing = check_run(share, opts.config) or write_manifest(share, new_manifest(opts.config.as_dict(), "
           "opts.created_by, 'ed25519:mutant', task_record(opts.config)))",
           ("tests/test_start.py::test_a_refused_start_leaves_the_share_as_it_was",)),
    Mutant("the outer Nesterov step reads the delta the wrong way round", "fedsync/aggregation/optimizers.py",
           "return (d + m * self.momentum) * self.lr", "return (m * self.momentum - d) * self.lr",
           ("tests/test_server_optimizers.py::test_momentum_optimizers_are_torch_sgd_on_the_negative_delta",)),
    Mutant("late updates enter the momentum", "fedsync/aggregation/optimizers.py",
           'new_state[f"m/{name}"] = m + d_on', 'new_state[f"m/{name}"] = m + d',
           ("tests/test_server_optimizers.py::test_late_updates_move_the_model_once_and_never_enter_the_state",)),
    Mutant("the coordinator feeds late updates into the optimizer's state", "fedsync/run/coordinating/intake.py",
           "if optimizer.stateful and self.aggregator.has_late:", "if False:",
           ("tests/test_server_state.py::test_a_late_update_moves_the_model_but_not_the_momentum",)),
    Mutant("a restarted coordinator forgets the optimizer's state", "fedsync/coordinator.py",
           "self.server_state = saved_server_state(self.share, self.optimizer, load_summary(self.share, closed[-1]))",
           "pass",
           ("tests/test_server_state.py::test_a_killed_and_restarted_coordinator_ends_with_the_uninterrupted_model",)),
    Mutant("int8 pieces past the first are read with the first blocks' scales", "fedsync/aggregation/intake.py",
           "values = dequantize(values, scales[spec.name][offset // BLOCK:], floats)",
           "values = dequantize(values, scales[spec.name], floats)",
           ("tests/test_compression.py::test_the_intake_and_the_median_see_the_decoded_values",)),
    Mutant("a redone round starts from the residual its first try left", "fedsync/tensors/residuals.py",
           "for p in reversed([k for k in self._rounds() if k < r]):",
           "for p in reversed([k for k in self._rounds() if k <= r]):",
           ("tests/test_compression.py::test_error_feedback_delays_what_int8_loses_and_survives_a_restart",)),
    Mutant("aliases reach the constructor", "fedsync/storage/yamlfile.py",
           "        _refuse_aliases(node)", "        pass",
           ("tests/test_yamlfile.py::test_aliases_are_refused_before_anything_is_expanded",)),
    Mutant("a read of an object does not notice it was replaced", "fedsync/storage/objects.py",
           'options["if_match"] = self.etag', "pass",
           ("tests/test_object_store.py::test_an_object_replaced_while_it_is_read_fails_the_read_instead_of_mixing_versions",)),
    Mutant("the lease on an object store is written unconditionally", "fedsync/storage/objects.py",
           'mode: Any = "create" if previous is None else {"e_tag": previous[0]}', 'mode: Any = "overwrite"',
           ("tests/test_object_store.py::test_the_lease_on_a_store_is_written_only_over_the_version_last_seen",)),
    Mutant("an inference output counts without its worker's signature", "fedsync/run/submitting/jobs.py",
           "if not verify(key, output_message(m), m.signature):", "if False:", (JUDGED,)),
    Mutant("NaN logits in rows an output does not say failed are taken", "fedsync/run/submitting/jobs.py",
           "if not bool(torch.isfinite(logits[ok]).all()):", "if False:", (JUDGED,)),
    Mutant("a second output for a taken chunk replaces the first", "fedsync/infer.py",
           "if chunk in self.done:", "if False:", (JUDGED,)),
    Mutant("a worker that stops heartbeating keeps its chunks", "fedsync/run/submitting/routing.py",
           "kept = {w: [c for c in queues.get(w, []) if c not in done] for w in speeds}",
           "kept = {w: [c for c in queues.get(w, []) if c not in done] for w in {**queues, **speeds}}",
           ("tests/test_routing.py::test_a_worker_that_stops_heartbeating_loses_its_chunks_to_the_others",)),
    Mutant("a worker that heartbeats but delivers nothing keeps its chunks", "fedsync/infer.py",
           "speeds[w] = min(speeds[w], self.rows[queue[0]] / (now - since))", "pass",
           ("tests/test_infer.py::test_a_live_worker_that_never_delivers_does_not_wedge_the_job",)),
    Mutant("no one takes over a slow worker's chunks at the end of a job", "fedsync/run/submitting/routing.py",
           "if not pending:", "if False:",
           ("tests/test_routing.py::test_at_the_tail_an_idle_faster_worker_takes_a_waiting_chunk_or_copies_a_running_one",
            "tests/test_routing.py::test_fast_workers_end_up_with_more_chunks_in_proportion_to_their_speed")),
    Mutant("a non-finite aggregate is written", "fedsync/aggregation/defence.py",
           "if not all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):",
           "if False:",
           ("tests/test_round_intake.py::test_a_non_finite_aggregate_takes_the_largest_update_out",)),
    Mutant("the deadline's extension is not waited out", "fedsync/run/coordinating/intake.py",
           "if late and enough:", "if late:",
           ("tests/test_round_intake.py::test_the_closing_rules_in_order_and_a_round_that_cannot_close",)),
    Mutant("a trimmed mean of five updates with trim 0.1 cuts nothing", "fedsync/aggregation/rules.py",
           "return min(max(int(trim * n), 1 if trim > 0 else 0), (n - 1) // 2)",
           "return min(int(trim * n), (n - 1) // 2)",
           ("tests/test_screening.py::test_trimmed_mean_cuts_at_least_one_value_at_each_end_while_one_stays",)),
    Mutant("an aggregate whose loss on held-out examples is not finite is written", "fedsync/aggregation/defence.py",
           "elif probe is not None and not math.isfinite(loss := probe(new_state)):", "elif False:",
           ("tests/test_runs.py::test_an_update_that_makes_the_model_s_loss_non_finite_is_taken_out_before_the_round_"
            "closes",)),
    Mutant("an update whose batch count overflows is taken in", "fedsync/aggregation/validity.py",
           "if low < 0 or high > steps:", "if False:",
           ("tests/test_defence.py::test_buffers_honest_training_cannot_produce_are_rejected_while_reading",)),
    Mutant("buffers take the weighted mean again", "fedsync/aggregation/rules.py",
           "    out.update(medians)\n", "",
           ("tests/test_defence.py::test_buffers_take_the_median_so_one_update_cannot_push_them",)),
    Mutant("a flipped update larger than most is taken in", "fedsync/aggregation/screening.py",
           "for key, c in cosines.items() if c < limit and norms[key] > PUSH * typical}",
           "for key, c in cosines.items() if False}",
           ("tests/test_defence.py::test_at_the_close_a_flipped_update_is_rejected_and_a_large_one_clipped",)),
]


def _copy_project(dest: Path) -> Path:
    """fedsync (its configs inside it, where the installed package has them), the tests and the pytest settings:
    run from `dest`, `import fedsync` and `python -m fedsync` find this copy before the installed one."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "fedsync", dest / "fedsync", ignore=skip)
    shutil.copytree(ROOT / "configs", dest / "fedsync" / "configs", ignore=skip)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _mutate(copy: Path, m: Mutant) -> None:
    path = copy / m.file
    text = path.read_text()
    assert text.count(m.line) == 1, f"{m.file} no longer holds `{m.line}` once: move the mutant '{m.what}' with it"
    path.write_text(text.replace(m.line, m.becomes))


def _pytest(copy: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=copy, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def mutant_runs(tmp: Path, workers: int = 3) -> tuple[subprocess.CompletedProcess[str],
                                                      list[tuple[Mutant, subprocess.CompletedProcess[str], float]]]:
    """The control (every mutant's tests on an unbroken copy, which must pass) and each mutant's run, with its
    seconds; `workers` runs at a time (they mostly start Python or wait on processes)."""
    clean = _copy_project(tmp / "clean")
    where = subprocess.run([sys.executable, "-c", "import fedsync.configs; print(fedsync.configs.__file__)"],
                           cwd=clean, capture_output=True, text=True, timeout=60)
    if not where.stdout.startswith(str(clean)):
        raise RuntimeError(f"the copy is not what runs: {where.stdout}{where.stderr}")

    def attempt(i: int) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        if i < 0:
            done = _pytest(clean, tuple(dict.fromkeys(t for m in MUTANTS for t in m.tests)))
        else:
            copy = _copy_project(tmp / f"mutant{i}")
            _mutate(copy, MUTANTS[i])
            done = _pytest(copy, MUTANTS[i].tests)
        return done, time.monotonic() - started

    with ThreadPoolExecutor(workers) as pool:
        (control, _), *results = pool.map(attempt, range(-1, len(MUTANTS)))
    return control, [(m, done, seconds) for m, (done, seconds) in zip(MUTANTS, results)]


def caught(done: subprocess.CompletedProcess[str]) -> bool:
    """pytest exits 1 when tests ran and failed (not 2-5: interrupted, usage, collection, nothing collected)."""
    return done.returncode == 1 and " failed" in done.stdout
