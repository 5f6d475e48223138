"""Every name in the share, in one place: docs/PROTOCOL.md section 2 is the same list in words.

Names are '/'-separated and relative to the share's root, whatever the medium (a folder today, an object
store's keys later); only a Store turns them into paths.
"""

from __future__ import annotations

import re

from fedsync.storage.yamlfile import reads_as_string

MANIFEST = "fedsync.yaml"
LEASE = "coordinator.yaml"
WORKERS = "workers"
METRICS = "metrics.csv"
FINAL_MODEL = "final.safetensors"
FINAL_MARKER = "final.yaml"
TRUST = "trust.yaml"
GLOBAL_MODEL = "global.safetensors"
ASSIGNMENT = "assignment.yaml"
UPDATES = "updates"
SUMMARY = "summary.yaml"
EVALUATION = "evaluation.yaml"
SERVER_STATE = "server_state.safetensors"  # the server optimizer's state after the round (momentum, moments)
SHARDS = "shards"
JOBS = "jobs"              # inference jobs, one folder each (docs/PROTOCOL.md section 5.14)
JOB_MARKER = "job.yaml"
JOB_PLAN = "plan.yaml"
JOB_MODEL = "model.safetensors"
JOB_INPUTS = "inputs"
JOB_OUTPUTS = "outputs"
REPORT_MD = "report.md"    # for people browsing the share: refreshed by the coordinator after each round
REPORT_PNG = "report.png"
SECAGG = "secagg"          # a secure-aggregation round's keys, envelopes, rosters and revealed shares (5.16)
TENSORS_SUFFIX = ".safetensors"
SEALED_SUFFIX = ".age"     # an update sealed to the coordinator: its tensor file's name and this (section 5.15)
MARKER_SUFFIX = ".yaml"

# anything else in a round folder is stray
ROUND_FILES = frozenset({GLOBAL_MODEL, ASSIGNMENT, UPDATES, SUMMARY, EVALUATION, SERVER_STATE, SECAGG})
COORDINATOR_ROOT_FILES = frozenset({MANIFEST, LEASE, METRICS, FINAL_MODEL, FINAL_MARKER, TRUST, REPORT_MD, REPORT_PNG})
COORDINATOR_ROUND_FILES = frozenset({GLOBAL_MODEL, ASSIGNMENT, SUMMARY, EVALUATION, SERVER_STATE})

ROUND_DIR = re.compile(r"^\d{4,9}$")
WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def basename(name: str) -> str:
    """The last part of a name: what messages call a file."""
    return name.rsplit("/", 1)[-1]


def round_dir(r: int) -> str:
    return f"{r:04d}"


def worker_file(name: str) -> str:
    return join(WORKERS, name + MARKER_SUFFIX)


def global_model(r: int) -> str:
    return join(round_dir(r), GLOBAL_MODEL)


def assignment(r: int) -> str:
    return join(round_dir(r), ASSIGNMENT)


def summary(r: int) -> str:
    return join(round_dir(r), SUMMARY)


def evaluation(r: int) -> str:
    return join(round_dir(r), EVALUATION)


def server_state(r: int) -> str:
    return join(round_dir(r), SERVER_STATE)


def updates_dir(r: int) -> str:
    return join(round_dir(r), UPDATES)


def update_tensors_name(worker: str, sealed: bool = False) -> str:
    """The update's tensor file as its marker names it (relative to the updates folder): `.age` after it when it is
    sealed to the coordinator."""
    return worker + TENSORS_SUFFIX + (SEALED_SUFFIX if sealed else "")


def is_update_tensors(name: str) -> bool:
    """Whether a name in an updates folder is a worker's tensor file, plain or sealed."""
    return name.endswith(TENSORS_SUFFIX) or name.endswith(TENSORS_SUFFIX + SEALED_SUFFIX)


def update_marker_name(worker: str) -> str:
    """The update's marker as it sits in the updates folder."""
    return worker + MARKER_SUFFIX


def update_marker_in_round(worker: str) -> str:
    """The marker's name relative to its round folder, as summaries record it."""
    return join(UPDATES, update_marker_name(worker))


def update_tensors(r: int, worker: str, sealed: bool = False) -> str:
    return join(updates_dir(r), update_tensors_name(worker, sealed))


def update_marker(r: int, worker: str) -> str:
    return join(round_dir(r), update_marker_in_round(worker))


def secagg_keys(r: int, worker: str) -> str:
    return join(round_dir(r), SECAGG, "keys", worker + MARKER_SUFFIX)


def secagg_shares(r: int, worker: str) -> str:
    return join(round_dir(r), SECAGG, "shares", worker + MARKER_SUFFIX)


def secagg_reveal(r: int, worker: str) -> str:
    return join(round_dir(r), SECAGG, "reveal", worker + MARKER_SUFFIX)


def secagg_roster(r: int, step: int) -> str:
    """The coordinator's roster after step `step` (1: keys, 2: envelopes, 3: masked inputs)."""
    return join(round_dir(r), SECAGG, f"roster-{step}{MARKER_SUFFIX}")


def shard_list(num_shards: int) -> str:
    """The coordinator's list of every shard's examples when the training set is cut `num_shards` ways."""
    return join(SHARDS, f"{num_shards:03d}.safetensors")


def job_dir(job: str) -> str:
    return join(JOBS, job)


def job_marker(job: str) -> str:
    return join(JOBS, job, JOB_MARKER)


def job_plan(job: str) -> str:
    return join(JOBS, job, JOB_PLAN)


def job_model(job: str) -> str:
    return join(JOBS, job, JOB_MODEL)


def chunk_name(chunk: int) -> str:
    """A chunk's inputs as job.yaml names them (relative to the job's folder)."""
    return join(JOB_INPUTS, f"{chunk:06d}{TENSORS_SUFFIX}")


def outputs_dir(job: str) -> str:
    return join(JOBS, job, JOB_OUTPUTS)


def output_stem(chunk: int, worker: str) -> str:
    return f"{chunk:06d}.{worker}"


def output_tensors(job: str, chunk: int, worker: str) -> str:
    return join(outputs_dir(job), output_stem(chunk, worker) + TENSORS_SUFFIX)


def output_marker(job: str, chunk: int, worker: str) -> str:
    return join(outputs_dir(job), output_stem(chunk, worker) + MARKER_SUFFIX)


OUTPUT_MARKER = re.compile(r"^(\d{6})\.([A-Za-z0-9][A-Za-z0-9._-]{0,63})\.yaml$")


def output_owner(file_name: str) -> tuple[int, str] | None:
    """(chunk, worker) of an output marker in a job's outputs/ folder; None for any other file."""
    m = OUTPUT_MARKER.match(file_name)
    if m is None or is_temporary(file_name) or is_conflict_copy(file_name):
        return None
    return int(m.group(1)), m.group(2)


def model_after(r: int, last_round: int) -> str:
    """Where the aggregate of round r lives: the next round's global model, or the final one."""
    return FINAL_MODEL if r >= last_round else global_model(r + 1)


def marker_owner(file_name: str) -> str | None:
    """The worker a marker file (`<worker>.yaml`) in workers/ or updates/ belongs to; None for any other file."""
    if is_temporary(file_name) or is_conflict_copy(file_name) or not file_name.endswith(MARKER_SUFFIX):
        return None
    return file_name[:-len(MARKER_SUFFIX)]


def is_temporary(name: str) -> bool:
    """Files still being written (ours or a sync tool's): never read them."""
    return name.startswith(".") or name.endswith(".tmp") or name.startswith("~syncthing~")


def is_conflict_copy(name: str) -> bool:
    """Syncthing's copy of a file two machines changed: reported, never read."""
    return ".sync-conflict-" in name


def check_job_name(name: str) -> str:
    """Job names become folder names in the share: the same portable alphabet as workers'."""
    return _portable(name, "job")


def check_worker_name(name: str) -> str:
    """Worker names become file names in the share, so they are restricted to a portable alphabet."""
    return _portable(name, "worker")


def _portable(name: str, what: str) -> str:
    if not WORKER_NAME.match(name):
        raise ValueError(f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if not reads_as_string(name):  # written unquoted by another implementation, it would be a number or a bool
        raise ValueError(f"{what} name {name!r} is not allowed: YAML reads it as a number, a bool, a date or null, "
                         f"not a name; add a letter (for example {what[0]}-{name})")
    return name
