"""A run's config: the built-in YAML files, user files laid over them, and `--set key=value` overrides.

The defaults live in one place, configs/digits.yaml; a user's file names only what it changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fedsync.aggregation.defence import Screens
from fedsync.aggregation.optimizers import ServerSettings, check_settings
from fedsync.aggregation.privacy.settings import DPSettings, WorkerDPSettings
from fedsync.aggregation.rules import RULES, needed_updates
from fedsync.base.errors import ConfigError
from fedsync.learning.augment import NAMED
from fedsync.learning.balance import BALANCE
from fedsync.learning.data import Dataset, Source, first
from fedsync.learning.device import PRECISIONS
from fedsync.learning.lora import BaseStorage, LoraSettings
from fedsync.learning.tasks import DataOptions, LanguageSettings, Task, TaskSettings, get_task
from fedsync.storage.markers import MarkerError, parse_record
from fedsync.storage.yamlfile import parse_yaml
from fedsync.tensors.encoding import ENCODINGS

TRUST_MODES = ("tofu", "explicit")
BUILTIN = ("digits", "cifar10", "causal_lm")  # the config files shipped in fedsync.configs (configs/ in the repository)

# Named recipes: the keys each sets, under whatever a user's file or --set gives (README, "Fewer, smaller rounds").
PRESETS: dict[str, dict[str, Any]] = {
    # McMahan et al. 2017: local epochs, the plain mean of the deltas (the default)
    "fedavg": {"server_optimizer": "none", "local_steps": None},
    # one local step per round: every worker's delta is -lr x one minibatch gradient, so the mean is a gradient
    # averaged over the workers' batches (synchronous data-parallel SGD; McMahan et al.'s FedSGD baseline)
    "fedsgd": {"server_optimizer": "none", "local_steps": 1},
    # Douillard et al. 2023 (DiLoCo): H local steps, then the outer Nesterov step, lr 0.7, momentum 0.9
    "diloco": {"server_optimizer": "nesterov", "server_lr": 0.7, "server_momentum": 0.9, "local_steps": 100},
}
# What secure_aggregation: true lays under the keys a user sets: the screens that need each update turned off.
SECURE = {"screen_factor": 0.0, "screen_max_ratio": 0.0, "clip_factor": 0.0, "screen_direction": False,
          "late_policy": "drop", "min_updates": 2}
# What a `dp` mapping lays under the keys a user sets: the screens (one weighs an update against the others, so one
# worker could move whether another's counts; every rejection's detail names the update's norm), folding late
# updates (a worker would count twice in a round), and federated evaluation (each worker's held-out accuracy,
# un-noised, in the summary). The clip bound alone limits what an update can do.
DP = {"screen_factor": 0.0, "screen_max_ratio": 0.0, "clip_factor": 0.0, "screen_direction": False,
      "late_policy": "drop", "federated_eval": 0.0}


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run; units are in the names' comments of configs/digits.yaml."""

    task: str                 # digits | cifar10 | imagefolder | an installed task: package.module:name or its name
    model: str                # one of the task's models (the built-in tasks: fedsync/learning/models.py)
    data_root: str | None     # where the task's data is, unless a machine gives its own with --data-root
    classes: list[str] | None # imagefolder: the class folder names; a class's index is its place in this list
    image_size: int | None    # imagefolder: images are resized to image_size x image_size pixels
    channels: int | None      # imagefolder: 1 (greyscale) or 3 (RGB)
    verify_checksums: bool    # torchvision's MD5 check of CIFAR-10; false only for fabricated data
    seed: int                 # initial weights, data split and shards all follow from it
    test_fraction: float      # digits: held-out share for the coordinator's evaluation
    partition: str            # iid | dirichlet
    dirichlet_alpha: float    # label skew of dirichlet shards (smaller = more skewed)
    preset: str               # fedavg | fedsgd | diloco: a named recipe (PRESETS), laid under the keys a user sets
    local_epochs: int         # passes over its shard a worker makes per round
    local_steps: int | None   # optimizer steps a worker takes per round instead of local_epochs passes; None: epochs
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: Any              # false | true (the task's own: cifar10, imagefolder crop+flip) | crop | flip | crop+flip
    precision: str            # auto | fp32 | bf16 | fp16: each worker resolves auto for its own device
    prox_mu: float            # FedProx proximal weight; 0 is plain local SGD
    balance: str              # equal | throughput: how the coordinator sizes each worker's work
    aggregation: str          # fedavg | fednova | median | trimmed_mean | krum | multi_krum | bulyan
    server_optimizer: str     # none | fedavgm | nesterov | fedadam | fedyogi (fedsync/aggregation/optimizers.py)
    server_lr: float | None   # the server optimizer's step size; None: its default (none 1, nesterov 0.7, ...)
    server_momentum: float | None  # fedavgm, nesterov: momentum; None: 0.9
    server_betas: list[float] | None  # fedadam, fedyogi: (b1, b2); None: (0.9, 0.99)
    server_eps: float | None  # fedadam, fedyogi: added to sqrt(v); None: 0.001
    compression: str          # none | bf16 | int8: how workers encode their updates (fedsync/tensors/encoding.py)
    error_feedback: bool      # a worker keeps what lossy compression left out and adds it to its next update
    trim: float               # trimmed_mean: the fraction of values cut at each end of every coordinate
    byzantine: int            # krum, multi_krum, bulyan: the attackers among a round's updates they are sized for
    screen_factor: float      # reject an update over this x the round's median norm (3+ updates); 0: off
    screen_max_ratio: float   # reject an update over this x the global model's norm; 0: off
    clip_norm: float          # scale every update with a larger L2 norm down to this norm; 0: off
    clip_factor: float        # scale every update over this x the round's median norm down to it (3+ updates); 0: off
    screen_direction: bool    # reject an update pointing away from the round's coordinate-wise median (3+ updates)
    trust: str                # tofu | explicit: which workers' keys count (fedsync/run/trust.py)
    exclude_after: int        # a worker whose updates are rejected for what they hold this many rounds in a row
                              # gets no more work (trust.yaml: excluded); 0: never
    quorum: Any               # float in (0, 1]: fraction of live assigned workers; int >= 1: a count
    min_updates: int          # a round never closes with fewer accepted updates
    min_workers: int          # a round opens once this many workers are live
    round_timeout: float      # seconds a round collects updates, by the coordinator's clock
    late_policy: str          # drop | fold: what becomes of an update that arrives after its round closed
    max_staleness: int        # late updates up to this many rounds old are recorded (and folded)
    staleness_exponent: float # fold weight = samples * (1 + rounds late) ** -staleness_exponent
    keep_rounds: int | None   # keep the tensors of the last this many closed rounds (and the final model); None: all
    heartbeat: float          # seconds between a worker's heartbeats
    worker_timeout: float     # seconds without a heartbeat before a worker counts as gone
    eval_batch_size: int
    eval_every: int           # the coordinator evaluates every this many rounds, and always the last
    eval_samples: int | None  # evaluate on the first this many test examples; None: all of them
    federated_eval: float     # fraction of each shard a worker holds out to evaluate each round's model; 0: off
    confidential_updates: bool = False  # workers seal their updates to the coordinator (age); configs/digits.yaml
                                        # sets it for new runs, a run from before it was a setting stays plain
    secure_aggregation: bool = False  # the coordinator learns only the round's weighted sum (SecAgg+)
    dp: DPSettings | None = None      # user-level DP-FedAvg (fedsync/aggregation/privacy/settings.py); None: off
    worker_dp: WorkerDPSettings | None = None  # DP-SGD on every worker (Opacus); None: off
    base_model: str | None = None     # causal_lm: this machine's copy of the base model's folder (each machine its own)
    max_length: int = 256             # causal_lm: tokens an example
    lora: LoraSettings | None = None  # causal_lm: the adapters (rank, alpha, dropout, target_modules); None: defaults

    def __post_init__(self) -> None:
        problems = []
        try:
            known = self.resolved_task().model_names()
            if self.model not in known:
                problems.append(f"model {self.model!r} is not one of task {self.task}'s: {', '.join(known)}")
        except ConfigError as e:
            problems.append(str(e))
        if not isinstance(self.augment, bool) and self.augment not in NAMED:
            problems.append(f"augment {self.augment!r} is not true, false or one of {', '.join(NAMED)}")
        if self.late_policy not in ("drop", "fold"):
            problems.append(f"late_policy {self.late_policy!r} is not drop or fold")
        if self.max_staleness < 1 or self.staleness_exponent < 0:
            problems.append("max_staleness must be at least 1 and staleness_exponent not negative")
        if self.keep_rounds is not None and self.keep_rounds <= self.max_staleness:
            problems.append(f"keep_rounds must exceed max_staleness ({self.max_staleness}): late updates that old "
                            "are still read, or null to keep every round's tensors")
        for name, allowed in (("precision", PRECISIONS), ("balance", BALANCE), ("aggregation", RULES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        problems.extend(check_settings(self.server_settings()))
        if self.compression not in ENCODINGS:
            problems.append(f"compression {self.compression!r} is not one of {', '.join(ENCODINGS)}")
        if self.preset not in PRESETS:
            problems.append(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.local_steps is not None and self.local_steps < 1:
            problems.append("local_steps must be at least 1, or null for local_epochs passes")
        if self.prox_mu < 0:
            problems.append("prox_mu must not be negative")
        if not 0 <= self.trim < 0.5:
            problems.append("trim must be at least 0 and below 0.5")
        if self.exclude_after < 0:
            problems.append("exclude_after must not be negative (0: never exclude)")
        if self.byzantine < 0:
            problems.append("byzantine must not be negative")
        elif self.min_updates < needed_updates(self.aggregation, self.byzantine):
            problems.append(f"aggregation {self.aggregation} with byzantine {self.byzantine} needs at least "
                            f"{needed_updates(self.aggregation, self.byzantine)} updates a round: set min_updates "
                            f"(now {self.min_updates}) and min_workers to that or more")
        if self.screen_factor < 0 or self.screen_max_ratio < 0:
            problems.append("screen_factor and screen_max_ratio must not be negative (0 turns a bound off)")
        if self.clip_norm < 0:
            problems.append("clip_norm must not be negative (0 turns clipping off)")
        if self.clip_factor != 0 and self.clip_factor < 1:
            problems.append("clip_factor must be at least 1 (the round's median norm), or 0 to turn it off")
        if self.trust not in TRUST_MODES:
            problems.append(f"trust {self.trust!r} is not one of {', '.join(TRUST_MODES)}")
        if self.partition not in ("iid", "dirichlet"):
            problems.append(f"partition {self.partition!r} is not iid or dirichlet")
        q = self.quorum
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) \
                or (isinstance(q, int) and q < 1) or (isinstance(q, float) and not 0 < q <= 1):
            problems.append(f"quorum {q!r} must be a count (integer >= 1) or a fraction (0 < q <= 1.0)")
        if not 0 <= self.federated_eval <= 0.5:
            problems.append("federated_eval must be between 0 (off) and 0.5 (half of each shard held out)")
        if self.eval_samples is not None and self.eval_samples < 1:
            problems.append("eval_samples must be at least 1, or null for the whole test set")
        for name in ("local_epochs", "batch_size", "min_updates", "min_workers", "eval_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("lr", "round_timeout", "heartbeat", "worker_timeout", "dirichlet_alpha"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive")
        if self.momentum < 0 or self.weight_decay < 0:
            problems.append("momentum and weight_decay must not be negative")
        if self.worker_timeout <= 2 * self.heartbeat:
            problems.append("worker_timeout must exceed two heartbeats, or live workers look gone")
        if self.secure_aggregation:
            problems.extend(self._secure_problems())
        if self.task != "causal_lm" and (self.lora is not None or self.base_model is not None):
            problems.append(f"base_model and lora are the causal_lm task's: task {self.task} takes neither")
        if self.lora is not None and not (self.lora.rank >= 1 and self.lora.alpha > 0 and 0 <= self.lora.dropout < 1):
            problems.append("lora: rank must be at least 1, alpha positive and dropout in [0, 1)")
        if self.dp is not None:
            problems.extend(self.dp.problems() + self._dp_problems(self.dp))
        if self.worker_dp is not None:
            problems.extend(self.worker_dp.problems())
            if self.prox_mu > 0:
                problems.append("worker_dp does not combine with prox_mu: the proximal term is not a per-example "
                                "gradient, so DP-SGD would not bound it")
        if problems:
            raise ConfigError("config: " + "; ".join(problems))

    def _secure_problems(self) -> list[str]:
        """What cannot work when the coordinator never sees an individual update (README, "Secure aggregation")."""
        problems = []
        if not self.clip_norm > 0:
            problems.append("secure_aggregation clips each update on its worker: set clip_norm (the median norm of "
                            "round 1's updates in a plain run's 0001/summary.yaml; 5 on digits)")
        if self.aggregation != "fedavg":
            problems.append(f"secure_aggregation sums updates: aggregation {self.aggregation} needs each update "
                            "on its own; use fedavg")
        off = self._turn_off(("screen_factor", "screen_max_ratio", "clip_factor"))
        if off:
            problems.append("secure_aggregation hides each update, so the coordinator cannot screen it: set "
                            + ", ".join(off))
        if self.late_policy != "drop":
            problems.append("secure_aggregation drops late updates (a late update is not in the round's masks): "
                            "set late_policy=drop")
        if self.compression != "none":
            problems.append("secure_aggregation sends updates as 32-bit integers chosen from clip_norm and the "
                            "workers' count: set compression=none")
        if self.min_updates < 2:
            problems.append("secure_aggregation needs min_updates of 2 or more: the sum of one update is that update")
        return problems

    def _turn_off(self, numbers: tuple[str, ...]) -> list[str]:
        """How to turn off those of these settings that are on, and screen_direction: `key=0` each."""
        return [f"{k}=0" for k in numbers if getattr(self, k)] + (
            ["screen_direction=false"] if self.screen_direction else [])

    def _dp_problems(self, dp: DPSettings) -> list[str]:
        """What would break the guarantee's arithmetic (README, "Privacy")."""
        problems = []
        if not self.clip_norm > 0:
            problems.append("dp adds noise in proportion to the clip bound: set clip_norm (with dp.adaptive_clip, the "
                            "first round's bound; the median norm of round 1's updates in a plain run's summary)")
        if self.aggregation != "fedavg":
            problems.append(f"dp accounts for a noised sum of clipped updates: aggregation {self.aggregation} is not "
                            "a sum (one update moves a median or a selection by more than the bound): use fedavg")
        on = self._turn_off(("screen_factor", "screen_max_ratio", "clip_factor", "federated_eval"))
        if on:
            problems.append("dp cannot let one worker's update decide whether another's counts, nor publish an "
                            "update's norm or un-noised held-out accuracies: set " + ", ".join(on))
        if self.late_policy != "drop":
            problems.append("dp counts each worker once a round: set late_policy=drop")
        if dp.noise == "distributed" and not self.secure_aggregation:
            problems.append("dp.noise distributed splits the noise across the workers' masked inputs: it needs "
                            "secure_aggregation: true (without it the coordinator sees each update with a part of "
                            "the noise); use noise: central")
        if self.secure_aggregation and dp.adaptive_clip:
            problems.append("dp.adaptive_clip needs the count of updates under the bound, which secure aggregation "
                            "hides: use a fixed clip_norm with secure_aggregation")
        if dp.delta >= 1 / self.min_workers:
            problems.append(f"dp.delta {dp.delta:g} is not below 1 / min_workers ({1 / self.min_workers:g}): a delta "
                            "that large allows one worker's data to leak whole")
        return problems

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recipe(self) -> str:
        """What the run does, in one line for its start: the preset and what it set, the rule, the server step, the
        updates' encoding, screening and clipping, the quorum and whose keys count."""
        s = self.server_settings().resolved()
        server = s.name if s.name == "none" else (
            f"{s.name} (lr {s.lr:g}" + (f", momentum {s.momentum:g}" if s.momentum is not None else "") + ")")
        work = f"{self.local_steps} local steps" if self.local_steps else f"{self.local_epochs} local epoch(s)"
        clip = f", clip_norm {self.clip_norm:g}" if self.clip_norm else ""
        dp = self.dp
        private = "" if dp is None else (
            f"; differential privacy: {dp.noise} noise, multiplier {dp.noise_multiplier:g}"
            + (", adaptive clip" if dp.adaptive_clip else "") + f", delta {dp.delta:g}"
            + (f", target epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else ", no target"))
        if self.worker_dp is not None:
            private += f"; DP-SGD on workers, multiplier {self.worker_dp.noise_multiplier:g}"
        return (f"preset {self.preset}: {work} of lr {self.lr:g}, aggregation {self.aggregation}, server optimizer "
                f"{server}, updates {self.compression}{clip}, quorum {self.quorum}, balance {self.balance}, "
                f"trust {self.trust}{private}")

    def screens(self, clip_norm: float | None = None) -> Screens:
        """The screens, clipping to `clip_norm` when given (a dp round's bound), else to the config's."""
        return Screens(self.screen_factor, self.screen_max_ratio, self.clip_norm if clip_norm is None else clip_norm,
                       self.clip_factor, self.screen_direction)

    def server_settings(self) -> ServerSettings:
        betas = tuple(self.server_betas) if self.server_betas is not None else None
        return ServerSettings(self.server_optimizer, self.server_lr, self.server_momentum, betas,  # type: ignore[arg-type]
                              self.server_eps)

    def resolved_task(self, storage: BaseStorage = BaseStorage()) -> Task:
        """The task this config names, shaped by its settings (imagefolder's classes and input shape; causal_lm's
        base, held on this machine as `storage` says)."""
        classes = tuple(self.classes) if self.classes is not None else None
        language = LanguageSettings(Path(self.base_model) if self.base_model else None, self.max_length,
                                    self.lora or LoraSettings(), storage)
        return get_task(self.task).configured(TaskSettings(classes, self.image_size, self.channels, language))

    def data_options(self, note: Callable[[str], None] = print, memory_budget: int | None = None) -> DataOptions:
        """How this machine loads the data: the config's settings, its memory budget (None: automatic), and its log
        for what a loader skips."""
        return DataOptions(seed=self.seed, test_fraction=self.test_fraction, verify_checksums=self.verify_checksums,
                           memory_budget=memory_budget, note=note)


def test_examples(test: Source, cfg: RunConfig) -> Source:
    """What the coordinator evaluates a model on: the first `eval_samples` test examples, or all of them."""
    return test if cfg.eval_samples is None else first(test, cfg.eval_samples)


def load_data(cfg: RunConfig, location: str | None, note: Callable[[str], None]) -> tuple[Dataset | None, Source]:
    """What a coordinator holds: a shared task's data set (its training part is cut into shards) and its test part;
    for a private task, no training data and this machine's own test data."""
    task = cfg.resolved_task()
    if task.private:
        return None, task.load_own(location, cfg.data_options(note))
    dataset = task.load(location, cfg.data_options(note))
    return dataset, dataset.test


def _builtin_text(name: str) -> bytes:
    return resources.files("fedsync.configs").joinpath(f"{name}.yaml").read_bytes()


def _load_mapping(data: bytes, where: str) -> dict[str, Any]:
    try:
        loaded = parse_yaml(data)
    except Exception as e:  # yaml's errors have no common public base beyond Exception
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    return loaded


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, values read as YAML scalars (so 0.5 is a float and null is None)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip()] = parse_yaml(value.encode()) if value.strip() else None
    return out


def load_config(source: str = "digits", overrides: dict[str, Any] | None = None) -> RunConfig:
    """A built-in name (digits, cifar10) or a YAML file; keys it leaves out come from configs/digits.yaml."""
    merged = _load_mapping(_builtin_text("digits"), "configs/digits.yaml")
    given: dict[str, Any] = {}  # what the user set: a preset lies under it, over the built-in defaults
    if source in BUILTIN:
        merged.update(_load_mapping(_builtin_text(source), f"configs/{source}.yaml"))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file")
        given.update(_load_mapping(path.read_bytes(), str(path)))
    given.update(overrides or {})
    _nest(given)
    preset = given.get("preset", merged.get("preset"))
    if isinstance(preset, str) and preset in PRESETS:  # an unknown one is reported with the other problems
        merged.update(PRESETS[preset])
    if given.get("secure_aggregation", merged.get("secure_aggregation")) is True:
        merged.update(SECURE)
    if given.get("dp", merged.get("dp")) is not None:
        merged.update(DP)
    merged.update(given)
    return config_from_dict(merged, f"config {source}")


def _nest(given: dict[str, Any]) -> None:
    """Fold `--set dp.noise_multiplier=1.1` into the `dp` mapping (created when absent)."""
    for key in [k for k in given if "." in k]:
        head, _, tail = key.partition(".")
        inner = given.get(head)
        if head not in given or inner is None:
            inner = {}
        if not isinstance(inner, dict):
            raise ConfigError(f"--set {key}: {head} is not a mapping")
        given[head] = {**inner, tail: given.pop(key)}


def config_from_dict(values: dict[str, Any], where: str) -> RunConfig:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    try:
        return parse_record(RunConfig, values, where)
    except MarkerError as e:
        raise ConfigError(str(e)) from None


def on_this_machine(cfg: RunConfig, base_model: str | None) -> RunConfig:
    """The run's config with this machine's own base model folder (--base-model), when it gives one."""
    return dataclasses.replace(cfg, base_model=base_model) if base_model else cfg


MACHINE_LOCAL = ("data_root", "base_model")  # where one machine keeps its data and its base model: defaults, not
                                             # part of what the run is (fedsync/run/start.py checks the base itself)


def differences(a: RunConfig, b: RunConfig) -> list[str]:
    """The keys in which two configs describe different runs; where a machine keeps its data is not one."""
    da, db = a.as_dict(), b.as_dict()
    return [f"{k}: {da[k]!r} in the share, {db[k]!r} now" for k in da if da[k] != db[k] and k not in MACHINE_LOCAL]
