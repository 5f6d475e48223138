"""Tasks: what is learned, bundled so that a run names it in one word. A task knows how to load its data on
*this* machine (from a location that machine gives: `--data-root`/`--data`, else the run config's `data_root`), its
classes and input shape, the models it builds and its augmentation.

A task's data is either shared or private. Shared (digits, cifar10): every machine holds the same data set, the
coordinator cuts its training part into shards and lists them, and evaluates on its test part. Private
(imagefolder): each worker trains on all of its own data and the coordinator evaluates on its own; no example leaves
its machine, and the run's config fixes what the machines must agree on (the class names, the input shape).

A task can live outside fedsync (README, "Your own task"): a config names it as `package.module:name` (a `Task`
object in an installed module) or by the name an installed package registers under the entry-point group
`fedsync.tasks`. fedsync never loads code from the share: every machine of a run has the task installed, and
the run records the task's version and model layout so that a machine with another one refuses before it trains.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsync.base.errors import ConfigError, DataError
from fedsync.learning import models
from fedsync.learning.augment import NAMED, crop_and_flip
from fedsync.learning.data import CIFAR_MEAN, CIFAR_STD, Dataset, Source, Split, load_cifar10, load_digits
from fedsync.learning.imagefolder import ImageSpec, load_folder, scale
from fedsync.learning.lora import AdaptedLM, BaseStorage, LoraSettings, base_hash, load_tokenizer
from fedsync.learning.text import encode, read_records
from fedsync.learning.train import Augment

ENTRY_POINTS = "fedsync.tasks"
BUILTIN_VERSION = "fedsync-1"  # the built-in tasks' version: changes when a built-in model or its data handling does


@dataclass(frozen=True)
class DataOptions:
    """How data is loaded: the run config's say, and this machine's memory budget; the location is each machine's
    own."""

    seed: int                # the digits held-out split follows from it
    test_fraction: float     # tasks without their own test set hold this share of the data out
    verify_checksums: bool   # check published checksums (false only for fabricated test data)
    memory_budget: int | None = None  # bytes of decoded private data kept in memory, beyond: streamed; None: auto
    note: Callable[[str], None] = print  # where a loader says what it skipped (the process's log)


@dataclass(frozen=True)
class LanguageSettings:
    """What a run's config (and this machine's --base-model) fix for the causal_lm task."""

    base_model: Path | None   # this machine's copy of the base model's folder; None: not given (yet)
    max_length: int           # tokens per example
    lora: LoraSettings
    storage: BaseStorage = BaseStorage()  # how this machine holds the base (a worker's precision and --quantize)


@dataclass(frozen=True)
class TaskSettings:
    """What a run's config fixes for a task whose shape it sets (imagefolder, causal_lm); None where it says
    nothing."""

    classes: tuple[str, ...] | None = None
    image_size: int | None = None
    channels: int | None = None
    language: LanguageSettings | None = None  # causal_lm; laid aside by every other task


Loader = Callable[[Path | None, DataOptions], Dataset]
OwnLoader = Callable[[Path, DataOptions], Source]


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]      # one example, channels first
    load_data: Loader | None          # shared data: training (cut into shards) and test (the coordinator's)
    default_location: str | None      # where its data is looked for when no location is given; None: built in
    augment: Augment | None = None    # applied to each training batch when the config's `augment` is true
    models: Mapping[str, models.ModelFactory] | None = None  # its own models by name; None: fedsync's built-in ones
    version: str = BUILTIN_VERSION    # recorded in the run: machines with another version of the task refuse
    own_data: OwnLoader | None = None  # private data instead: the examples at one machine's own location
    configure: Callable[[Task, TaskSettings], Task] | None = None  # the task as the config's settings shape it
    scale_images: Callable[[torch.Tensor], torch.Tensor] | None = None  # 8-bit images (N, C, H, W) as the model's
    # inputs, for inference jobs over image files (None: the task takes no image files)
    base_digest: Callable[[], str] | None = None  # the BLAKE3 of a base model's weights the task builds on, which
    # every machine of the run must hold (causal_lm); None: no such base
    export: Callable[[nn.Module, Path], None] | None = None  # writes a trained model into a folder in its library's
    # own layout (causal_lm: PEFT's adapter folder); None: `fedsync export` writes one safetensors file
    tokenizer: Callable[[], Any] | None = None  # the base model's tokenizer, for inference jobs of prompts whose
    # continuations the model writes (causal_lm); None: the task's jobs are tensors or images, answered by logits

    @property
    def private(self) -> bool:
        """Whether each machine brings its own data (workers train on all of it; no shards)."""
        return self.own_data is not None

    def configured(self, settings: TaskSettings) -> Task:
        """The task as a run's config shapes it; settings a task does not take are a config error."""
        if self.configure is not None:
            return self.configure(self, settings)
        given = [k for k in ("classes", "image_size", "channels") if getattr(settings, k) is not None]
        if given:
            raise ConfigError(f"task {self.name} fixes its own classes and input shape: {', '.join(given)} "
                              "apply to tasks such as imagefolder; leave them null")
        return self

    def load(self, location: str | None, options: DataOptions) -> Dataset:
        """A shared task's data from `location` on this machine (or its default), checked against what the task
        declares, so a loader that returns something else fails here and not in the middle of a round."""
        if self.load_data is None:
            raise DataError(f"task {self.name} has no shared data set: each machine brings its own (--data DIR)")
        where = location or self.default_location
        data = self.load_data(Path(where) if where else None, options)
        for split, part in (("training", data.train), ("test", data.test)):
            self._check(part, data.num_classes, split)
        return data

    def load_own(self, location: str | None, options: DataOptions) -> Source:
        """A private task's examples at this machine's `location`: a worker's training data, or the coordinator's
        test data."""
        if self.own_data is None:
            raise DataError(f"task {self.name}'s data is shared: it is cut into shards by the coordinator")
        if not location:
            raise DataError(f"task {self.name} trains on each machine's own data: give its folder with --data DIR "
                            "(or data_root in the config)")
        data = self.own_data(Path(location), options)
        if isinstance(data, Split):
            self._check(data, self.num_classes, "own")
        return data

    def augmentation(self, setting: bool | str) -> Augment | None:
        """The config's `augment`: false, true (the task's own), or one of fedsync/learning/augment.py's NAMED."""
        if isinstance(setting, str):
            return NAMED[setting]
        return self.augment if setting else None

    def _check(self, part: Split, num_classes: int, split: str) -> None:
        if tuple(part.x.shape[1:]) != self.input_shape or num_classes != self.num_classes:
            raise DataError(f"task {self.name}: its {split} data holds {tuple(part.x.shape[1:])} examples of "
                            f"{num_classes} classes; the task declares {self.input_shape} and {self.num_classes}")

    @property
    def registry(self) -> Mapping[str, models.ModelFactory]:
        """The models this task builds: its own, or fedsync's built-in ones."""
        return self.models if self.models is not None else models.REGISTRY

    def model_names(self) -> list[str]:
        return sorted(self.registry)

    def build_model(self, name: str, seed: int | None = None) -> nn.Module:
        return models.build_model(name, self.num_classes, seed, self.registry)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task a config names: built in, `package.module:attribute`, or an installed entry point; anything else,
    or a task that is not installed on this machine, is a config error."""
    if name not in TASKS:
        TASKS[name] = _by_reference(name) if ":" in name else _by_entry_point(name)
    return TASKS[name]


def _by_reference(name: str) -> Task:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"task {name!r}: module {e.name} is not installed on this machine (fedsync never loads "
                          "code from the share: install the task's package on every machine of the run)") from None
    except Exception as e:  # noqa: BLE001 - the task's own code failed to import: say what it raised
        raise ConfigError(f"task {name!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    task = getattr(module, attribute, None)
    if not isinstance(task, Task):
        what = "missing" if task is None else f"a {type(task).__name__}"
        raise ConfigError(f"task {name!r}: {module_name}.{attribute} is {what}, not a fedsync.learning.tasks.Task")
    return task


def _by_entry_point(name: str) -> Task:
    found = metadata.entry_points(group=ENTRY_POINTS, name=name)
    if not found:
        installed = sorted(ep.name for ep in metadata.entry_points(group=ENTRY_POINTS))
        raise ConfigError(f"task {name!r} is not one of {', '.join(sorted(BUILTIN) + installed)} (built in, or "
                          f"installed under the entry-point group {ENTRY_POINTS}); a task of your own is named "
                          "`package.module:name`")
    entry = next(iter(found))
    try:
        task = entry.load()
    except Exception as e:  # noqa: BLE001 - the task's own code failed to import: say what it raised
        raise ConfigError(f"task {name!r} ({entry.value}, from {entry.dist.name if entry.dist else 'a package'}): "
                          f"loading it failed: {type(e).__name__}: {e}") from None
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r}: the entry point {entry.value} is a {type(task).__name__}, not a "
                          "fedsync.learning.tasks.Task")
    return task


def _shaped_by_config(root: Path, options: DataOptions) -> Source:
    raise ConfigError("this task is shaped by its run's config (imagefolder: classes, image_size, channels; causal_lm: "
                      "base_model, max_length, lora): load it through the config")


def _image_task(task: Task, settings: TaskSettings) -> Task:
    """imagefolder as a run's config shapes it: its classes, image size and channels are the config's."""
    classes, size, channels = settings.classes, settings.image_size, settings.channels
    if classes is None or size is None or channels is None:
        missing = [k for k in ("classes", "image_size", "channels") if getattr(settings, k) is None]
        raise ConfigError(f"task imagefolder needs {', '.join(missing)} in the config: classes (the class folder "
                          "names, in the order that fixes their indices), image_size (pixels; images are resized to "
                          "it) and channels (1: greyscale, 3: RGB)")
    problems = []
    if len(classes) < 2 or len(set(classes)) != len(classes):
        problems.append("classes must name at least 2 different classes")
    bad = [c for c in classes if not c or c.startswith(".") or "/" in c or "\\" in c]
    if bad:
        problems.append(f"classes {bad} are not folder names")
    if not 4 <= size <= 1024:
        problems.append("image_size must be between 4 and 1024 pixels")
    if channels not in (1, 3):
        problems.append("channels must be 1 (greyscale) or 3 (RGB)")
    if problems:
        raise ConfigError("task imagefolder: " + "; ".join(problems))
    spec = ImageSpec(tuple(classes), size, channels)
    return replace(task, num_classes=len(classes), input_shape=(channels, size, size),
                   models=models.image_models(channels),
                   own_data=lambda root, o: load_folder(root, spec, o.memory_budget, o.note))


def _language_task(task: Task, settings: TaskSettings) -> Task:
    """causal_lm as a run's config and this machine shape it: LoRA adapters (model `lora`) on the base model in
    this machine's folder, trained on its own JSON lines text, `max_length` tokens an example."""
    lm = settings.language
    if lm is None:
        raise ConfigError("task causal_lm is shaped by its run's config (base_model, max_length, lora): load it "
                          "through the config")
    if not 8 <= lm.max_length <= 65536:
        raise ConfigError("max_length must be between 8 and 65536 tokens")

    def base() -> Path:
        if lm.base_model is None:
            raise ConfigError("task causal_lm trains adapters on a base model every machine holds: give this "
                              "machine's copy of its folder with --base-model DIR (or base_model in the config)")
        return lm.base_model

    tokenizer = functools.cache(lambda: load_tokenizer(base()))

    def own(root: Path, options: DataOptions) -> Source:
        return encode(read_records(root), tokenizer(), lm.max_length, options.note)

    return replace(task, input_shape=(lm.max_length,),
                   models={"lora": lambda _: AdaptedLM(base(), lm.lora, storage=lm.storage)},
                   own_data=own, base_digest=lambda: base_hash(base()),
                   export=lambda model, folder: model.save_adapter(folder),  # type: ignore[operator]
                   tokenizer=tokenizer)


def _cifar_images(x: torch.Tensor) -> torch.Tensor:
    """CIFAR-10's inputs from 8-bit RGB: scaled to 0..1 and normalised per channel, as its loader does."""
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


BUILTIN = ("digits", "cifar10", "imagefolder", "causal_lm")
register(Task("digits", num_classes=10, input_shape=(1, 8, 8),
              load_data=lambda _, o: load_digits(o.seed, o.test_fraction), default_location=None,
              scale_images=lambda x: x.float() / 255))  # digits' pixels are ink from 0 to 1
register(Task("cifar10", num_classes=10, input_shape=(3, 32, 32),
              load_data=lambda root, o: load_cifar10(root or Path("./data"), o.verify_checksums),
              default_location="./data", augment=crop_and_flip, scale_images=_cifar_images))
register(Task("imagefolder", num_classes=0, input_shape=(), load_data=None, default_location=None,
              augment=crop_and_flip, models=models.image_models(3), configure=_image_task,
              own_data=_shaped_by_config, scale_images=scale))
register(Task("causal_lm", num_classes=0, input_shape=(), load_data=None, default_location=None,
              models={"lora": lambda _: nn.Identity()}, configure=_language_task, own_data=_shaped_by_config))
