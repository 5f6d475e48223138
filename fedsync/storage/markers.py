"""The YAML files of the share as typed records, parsed strictly: a malformed file is a MarkerError."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

FORMAT_VERSION = 2
HEX64 = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


class Measure(float):
    """A float that may be NaN or infinite: a test metric of a model that diverged is recorded, not refused.
    Every other float in the share must be finite."""


class MarkerError(ValueError):
    """A YAML file in the share does not match its schema."""


class PathOutsideFolder(MarkerError):
    """A marker names a file outside the folder it may refer to."""


class FormatMismatch(MarkerError):
    """A file carries another share format version than this fedsync speaks."""

    def __init__(self, where: str, found: int) -> None:
        self.found = found
        if found > FORMAT_VERSION:
            msg = (f"{where} uses share format {found}, written by a newer fedsync; "
                   f"this fedsync reads format {FORMAT_VERSION}: upgrade fedsync on this machine")
        else:
            msg = (f"{where} uses the older share format {found}; this fedsync reads format {FORMAT_VERSION}: "
                   "finish that run with the fedsync that started it, or start a new share")
        super().__init__(msg)


def check_relative_path(path: str, where: str) -> str:
    """Files a marker names stay inside the share: no absolute paths, no '..', no hidden names."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or ":" in path
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
        raise PathOutsideFolder(f"{where}: {path!r} is not a relative path inside the share")
    return path


@dataclass(frozen=True)
class FileRef:
    """A file named with its size and BLAKE3 hash, so a reader can tell a whole copy from a partial one."""

    file: str
    blake3: str
    bytes: int

    def __post_init__(self) -> None:
        check_relative_path(self.file, "file")
        if not HEX64.match(self.blake3):
            raise MarkerError(f"blake3: {self.blake3!r} is not 64 lowercase hex digits")
        if self.bytes < 0:
            raise MarkerError(f"bytes: {self.bytes} is negative")


@dataclass(frozen=True)
class TaskRecord:
    """What every machine of a run must have installed: the task (as the config names it), its version, and the
    layout of the model it builds (docs/PROTOCOL.md section 5.1)."""

    name: str
    version: str
    layout: str  # BLAKE3 of the model's tensor names, dtypes and shapes
    base: str | None = None  # causal_lm: BLAKE3 of the base model's weight files every machine must hold

    def __post_init__(self) -> None:
        for name in ("layout", "base"):
            value = getattr(self, name)
            if value is not None and not HEX64.match(value):
                raise MarkerError(f"{name}: {value!r} is not 64 lowercase hex digits")


@dataclass
class Manifest:
    """fedsync.yaml: the run's identity and resolved config, written once by the coordinator."""

    format: int
    run_id: str
    created: str
    created_by: str
    coordinator_key: str  # the public key that signs this run's assignments, trust.yaml and final.yaml
    config: dict[str, Any]
    task: TaskRecord | None = None  # None only in shares of fedsync before task records
    recipient: str | None = None  # confidential_updates: the age1… key workers seal their updates to
    recipient_signature: str | None = None  # the coordinator's, over signing.recipient_message


@dataclass
class CoordinatorLease:
    """coordinator.yaml: who drives the run, refreshed by that coordinator; its state for `fedsync status`."""

    format: int
    run_id: str
    owner: str
    host: str
    pid: int
    heartbeat: int
    state: str
    round: int | None
    note: str
    rejected: list[Rejected] = dataclasses.field(default_factory=list)  # the open round's, as they are decided
    written_at: str | None = None  # UTC time of this write, for people: liveness counts by the reader's own clock
    accepted: list[str] = dataclasses.field(default_factory=list)  # the open round's accepted updates so far
    quorum: int | None = None      # accepted updates that close the open round early, as of this write
    rounds: int | None = None      # the run's total rounds this coordinator drives to (its --rounds)


@dataclass
class WorkerTask:
    shard: int | None               # the shard to train on; None: the worker's own data (a private task)
    local_epochs: int
    local_steps: int | None = None  # set by balance: throughput: optimizer steps to take instead of epochs
    samples: int | None = None      # own data: the examples the worker registered, the bound on what it may claim

    def __post_init__(self) -> None:
        if (self.shard is None) == (self.samples is None):
            raise MarkerError("a worker's task names either a shard or, for its own data, its samples")


@dataclass
class Assignment:
    """<round>/assignment.yaml: the round is open once this exists and its model has the named hash."""

    format: int
    run_id: str
    round: int
    rounds: int
    model: FileRef
    num_shards: int                 # workers that train on a shard (0 when all bring their own data)
    time_budget_s: float
    workers: dict[str, WorkerTask]
    shards: FileRef | None  # shards/NNN.safetensors: every shard's examples, listed; None when no worker has a shard
    signature: str | None = None  # the coordinator's, over signing.assignment_message


@dataclass(frozen=True)
class HeldOut:
    """A model's loss and accuracy on a worker's held-out examples (federated evaluation), or their mean over
    workers weighted by `samples`."""

    loss: Measure      # mean cross-entropy (NaN or infinite when the model was not finite)
    accuracy: float
    samples: int

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy <= 1 or self.samples < 1:
            raise MarkerError(f"accuracy {self.accuracy} must lie in [0, 1] and samples {self.samples} be at least 1")


@dataclass
class UpdateMarker:
    """<round>/updates/<worker>.yaml: the update counts once this exists and its tensors have the named hash."""

    format: int
    round: int
    worker: str
    base: str
    tensors: FileRef | None  # None only with `diverged`: nothing was uploaded
    samples: int       # distinct examples trained on this round: the update's FedAvg weight
    steps: int         # optimizer steps taken: FedNova's normalisation
    train_loss: Measure  # NaN or infinite only with `diverged`
    seconds: float
    device: str
    diverged: str | None = None  # why the worker did not upload its update (its training diverged)
    signature: str | None = None  # the worker's, over signing.update_message
    evaluation: HeldOut | None = None  # federated_eval: the round's global model on the worker's held-out part
    timings: dict[str, float] | None = None  # seconds: prepare_s, evaluate_s, train_s, publish_s (informational)
    encoding: str = "none"  # how the tensor file holds the delta: none | bf16 | int8 (PROTOCOL.md section 5.13)
    encryption: str = "none"  # none | age: the tensor file sealed to the run's recipient (PROTOCOL.md section 5.15)
    sealed_head: str | None = None  # encryption age: BLAKE3 of the file's header and payload nonce (PROTOCOL 5.15)
    worker_epsilon: float | None = None  # worker_dp: this worker's DP-SGD epsilon so far in the run (section 5.17)

    def __post_init__(self) -> None:
        if self.diverged is None and not math.isfinite(self.train_loss):
            raise MarkerError(f"train_loss: {self.train_loss} (NaN or infinite only when the marker says diverged)")


@dataclass
class WorkerInfo:
    """workers/<name>.yaml: a worker's registration and heartbeat, rewritten only by that worker."""

    format: int
    name: str
    host: str
    fedsync: str
    torch: str
    device: str
    device_name: str
    cuda_capability: str | None
    state: str
    round: int | None
    heartbeat: int
    precision: str = "fp32"
    samples_per_s: float | None = None  # measured training speed on the run's model; throughput balancing reads it
    device_fallback: str | None = None  # why --device auto trains on the CPU although a GPU is present
    public_key: str | None = None  # the key its update markers are signed with (ed25519:...)
    training_step: str = "eager"   # eager | cuda-graphs: whether its training step is captured
    compile_s: float | None = None  # seconds it took to compile and capture that step, once per process
    own_samples: int | None = None  # a private task's worker: the examples of its own it trains on (and holds out)
    written_at: str | None = None   # UTC time of this write, for people: liveness counts by the reader's own clock
    sent_bytes: int = 0             # update bytes it has written into the share since it started
    serves: bool = False            # it runs inference jobs' chunks (`fedsync worker --serve`)
    infer_samples_per_s: float | None = None  # inputs per second it predicts at: routing sizes jobs by it


@dataclass
class Accepted:
    worker: str
    samples: int
    steps: int
    weight: float
    train_loss: float
    seconds: float
    device: str
    norm: float | None = None  # the update's L2 norm over its floating tensors, as read
    clipped: bool = False      # scaled down to clip_norm before aggregating
    evaluation: HeldOut | None = None  # its federated evaluation of the round's global model
    bytes: int | None = None   # its tensor file's size: what it sent
    train_s: float | None = None  # its training time, from its marker's timings


@dataclass
class Rejected:
    worker: str
    file: str
    reason: str
    detail: str


@dataclass
class Late:
    """An update that arrived after its round closed, and what became of it."""

    worker: str
    round: int
    outcome: str   # folded | dropped | rejected
    weight: float  # its weight in this round's aggregate when folded, else 0
    detail: str


@dataclass
class Traffic:
    """Tensor bytes a round moved through the share."""

    model_bytes: int  # the round's global model
    down_bytes: int   # the global model, once for each worker that answered the round
    up_bytes: int     # the accepted updates' tensor files


@dataclass
class PrivacyRecord:
    """A round's differential privacy (docs/PROTOCOL.md section 5.17): what it released and the budget spent so far."""

    epsilon: float          # spent by the run through this round, at `delta` (dp-accounting's RDP accountant)
    delta: float
    noise: str              # central | distributed
    noise_multiplier: float # the released sum's noise over the clip bound (distributed: what the survivors' parts add
                            # up to); the accountant's z
    sample_rate: float      # workers assigned / workers enrolled
    clip: float             # the L2 bound this round's updates were clipped to
    denominator: int        # the mean divides the noised sum by this (the workers assigned)
    releases: int = 1       # models of this round that may have been seen: 2 after a coordinator stopped between
                            # writing one and its summary; 0 for a redone round (no sum came out)
    next_clip: float | None = None       # adaptive_clip: the next round's bound
    fraction_under: float | None = None  # adaptive_clip: the noised fraction of updates within the bound


@dataclass
class Summary:
    """<round>/summary.yaml: the coordinator's decision; a round is closed once this exists."""

    format: int
    round: int
    closed_because: str
    seconds: float
    model: FileRef
    accepted: list[Accepted]
    rejected: list[Rejected]
    missing: list[str]
    ignored: list[str]
    late: list[Late]
    aggregation: str    # fedavg | fednova | median | trimmed_mean
    step_scale: float   # fednova's effective step count applied to the parameters' mean; 1 for fedavg
    metrics: dict[str, Measure]
    timings: dict[str, float]
    federated: HeldOut | None = None  # the accepted workers' evaluations of the round's global model, weighted mean
    closed_at: str | None = None      # UTC time the round closed, for people
    traffic: Traffic | None = None    # tensor bytes that crossed the share this round
    compute: dict[str, float] = dataclasses.field(default_factory=dict)  # training seconds by device kind
    server_optimizer: str = "none"    # what turned the aggregate into the next model (PROTOCOL.md section 5.12)
    server_state: FileRef | None = None  # its state after this round (<round>/server_state.safetensors); None: none
    privacy: PrivacyRecord | None = None  # dp: the round's release and the budget spent through it


@dataclass
class Evaluation:
    """<round>/evaluation.yaml: the test metrics of the model a round produced, measured beside the next round."""

    format: int
    round: int
    model: str            # the blake3 of the model evaluated: the summary's aggregate
    test_accuracy: Measure
    test_loss: Measure
    samples: int          # test examples evaluated (eval_samples, or the whole test set)
    seconds: float
    device: str


@dataclass
class FinalMarker:
    """final.yaml: the run ended; final.safetensors holds the model trained through `round`."""

    format: int
    run_id: str
    round: int
    model: FileRef
    test_accuracy: Measure  # the last round's evaluation (NaN when its model was not finite)
    signature: str | None = None  # the coordinator's, over signing.final_message
    stopped_because: str | None = None  # why the run ended before its --rounds (dp: the privacy budget)
    epsilon: float | None = None  # dp: the budget the run spent, at the run's delta


@dataclass
class TrustedKey:
    key: str    # ed25519:...
    state: str  # pinned (first key seen, trust: tofu) | approved (`fedsync trust`) | revoked (`--revoke`) | excluded


@dataclass
class TrustList:
    """trust.yaml: the worker keys the coordinator accepts updates from; signed by the coordinator's key."""

    format: int
    run_id: str
    workers: dict[str, TrustedKey]
    signature: str


@dataclass(frozen=True)
class ChunkRef(FileRef):
    """One chunk of a job's inputs: its file with size and hash, and how many inputs it holds."""

    rows: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rows < 1:
            raise MarkerError(f"rows: {self.rows} (a chunk holds at least one input)")


@dataclass(frozen=True)
class Generation:
    """How a job's prompts are continued (inputs: prompts); the same on every worker."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, the most likely token each step
    top_p: float = 1.0        # sampling only: the smallest set of tokens holding this much probability
    seed: int = 0             # sampling only: chunk c samples from seed + c, whichever worker runs it

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 65536:
            raise MarkerError(f"max_new_tokens: {self.max_new_tokens} is not between 1 and 65536")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise MarkerError(f"temperature {self.temperature} (>= 0) or top_p {self.top_p} (in (0, 1]) is out "
                              "of range")


@dataclass
class JobMarker:
    """jobs/<job>/job.yaml: the job exists once this exists and the files it names have their hashes. Written once,
    last, by the process that submitted the job (`fedsync infer`)."""

    format: int
    job: str
    run_id: str
    task: TaskRecord       # the task and model layout the job's model has: a worker of another one refuses
    model_name: str        # the task's model the weights are loaded into
    model: FileRef         # model.safetensors beside it
    model_source: str      # what the submitter asked for (final, round N, a file): informational
    inputs: str            # tensors (chunks hold `x`) | images | prompts (chunks hold `bytes` and `offsets`)
    source: str            # BLAKE3 of the inputs' identity: the file's bytes, or the image folder's listing
    rows: int              # inputs in all
    chunk_rows: int        # inputs per chunk (the last may hold fewer)
    chunks: list[ChunkRef]
    created_at: str | None = None  # UTC, for people
    generation: Generation | None = None  # inputs: prompts only

    def __post_init__(self) -> None:
        if self.inputs not in ("tensors", "images", "prompts"):
            raise MarkerError(f"inputs: {self.inputs!r} is not tensors, images or prompts")
        if (self.generation is None) != (self.inputs != "prompts"):
            raise MarkerError("generation: given for prompts, and only for them")
        if sum(c.rows for c in self.chunks) != self.rows:
            raise MarkerError(f"chunks hold {sum(c.rows for c in self.chunks)} inputs, rows says {self.rows}")


@dataclass
class OutputProblem:
    """A worker's output for a chunk that the submitter did not take, and why."""

    chunk: int
    worker: str
    reason: str
    detail: str


@dataclass
class JobPlan:
    """jobs/<job>/plan.yaml: which worker runs which chunks and which outputs were taken; the submitter's lease on
    the job. Rewritten whole by the submitter when it changes, and at least every heartbeat while it runs."""

    format: int
    job: str
    owner: str                    # host:pid:random of the submitting process
    host: str
    heartbeat: int                # increases with every rewrite
    state: str                    # running | done | stopped
    queues: dict[str, list[int]]  # worker -> the chunks it should run, in order
    accepted: dict[str, list[int]]  # worker -> the chunks whose output from it was taken
    problems: list[OutputProblem] = dataclasses.field(default_factory=list)
    written_at: str | None = None

    def __post_init__(self) -> None:
        if self.state not in ("running", "done", "stopped"):
            raise MarkerError(f"state: {self.state!r} is not running, done or stopped")


@dataclass
class FailedRow:
    row: int     # the input's place in its chunk, from 0
    reason: str  # non_finite | unreadable_image | bad_prompt


@dataclass
class OutputMarker:
    """jobs/<job>/outputs/<chunk>.<worker>.yaml: the worker's predictions for one chunk count once this exists and
    its tensors have the named hash."""

    format: int
    job: str
    chunk: int
    worker: str
    inputs: str            # the chunk's BLAKE3, from job.yaml
    model: str             # the job model's BLAKE3
    outputs: FileRef | None  # <chunk>.<worker>.safetensors: `logits` (rows x classes, float32), or for prompts the
                             # texts (`bytes`, `offsets`, `tokens`, `dropped`); None with `error`
    rows: int
    failed: list[FailedRow] = dataclasses.field(default_factory=list)  # inputs it could not predict (NaN logits)
    error: str | None = None  # why no input of the chunk could be predicted (wrong shape for the model, ...)
    seconds: float = 0.0
    device: str = ""
    signature: str | None = None  # the worker's, over signing.output_message


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build a record from loaded YAML, checking the format version first and every field's type."""
    if not isinstance(data, dict):
        raise MarkerError(f"{where}: expected a mapping at the top level")
    if "format" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        found = data.get("format")
        if not isinstance(found, int) or isinstance(found, bool):
            raise MarkerError(f"{where}: missing or non-integer 'format'")
        if found != FORMAT_VERSION:
            raise FormatMismatch(where, found)
    return parse_record(cls, data, where)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type, required) of a record's fields: resolving the type hints is the slow part of parsing a record,
    and a coordinator of 1,000 workers parses thousands of them a round."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(cls))


def parse_record(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise MarkerError(f"{where}: expected a mapping")
    values: dict[str, Any] = {}
    for name, tp, required in _fields(cls):
        if name in data:
            values[name] = _value(tp, data[name], f"{where}: {name}")
        elif required:
            raise MarkerError(f"{where}: missing field '{name}'")
    try:
        return cls(**values)
    except MarkerError as e:
        raise type(e)(f"{where}: {e}") from None


def _value(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Measure:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _value(args[1], v, f"{where}.{k}") for k, v in value.items()}
    elif origin is list:
        if isinstance(value, list):
            return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        return parse_record(tp, value, where)
    raise MarkerError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")
