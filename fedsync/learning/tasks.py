"""Tasks: what is learned, bundled so that a run names it in one word. A task knows how to load its data on
*this* machine (from a location that machine gives: `--data-root`, else the run config's `data_root`), its
classes and input shape, the models it builds and its augmentation.

A task can live outside fedsync (README, "Your own task"): a config names it as `package.module:name` (a `Task`
object in an installed module) or by the name an installed package registers under the entry-point group
`fedsync.tasks`. fedsync never loads code from the share: every machine of a run has the task installed, and
the run records the task's version and model layout so that a machine with another one refuses before it trains.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from torch import nn

from fedsync.base.errors import ConfigError, DataError
from fedsync.learning import models
from fedsync.learning.augment import crop_and_flip
from fedsync.learning.data import Dataset, load_cifar10, load_digits
from fedsync.learning.train import Augment

ENTRY_POINTS = "fedsync.tasks"
BUILTIN_VERSION = "fedsync-1"  # the built-in tasks' version: changes when a built-in model or its data handling does


@dataclass(frozen=True)
class DataOptions:
    """The run config's say in how data is loaded; the location is each machine's own."""

    seed: int                # the digits held-out split follows from it
    test_fraction: float     # tasks without their own test set hold this share of the data out
    verify_checksums: bool   # check published checksums (false only for fabricated test data)


Loader = Callable[[Path | None, DataOptions], Dataset]


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]      # one example, channels first
    load_data: Loader                 # training data (the worker's) and test data (the coordinator's)
    default_location: str | None      # where its data is looked for when no location is given; None: built in
    augment: Augment | None = None    # applied to each training batch when the config's `augment` is true
    models: Mapping[str, models.ModelFactory] | None = None  # its own models by name; None: fedsync's built-in ones
    version: str = BUILTIN_VERSION    # recorded in the run: machines with another version of the task refuse

    def load(self, location: str | None, options: DataOptions) -> Dataset:
        """The task's data from `location` on this machine (or its default), checked against what the task
        declares, so a loader that returns something else fails here and not in the middle of a round."""
        where = location or self.default_location
        data = self.load_data(Path(where) if where else None, options)
        for split, part in (("training", data.train), ("test", data.test)):
            if tuple(part.x.shape[1:]) != self.input_shape or data.num_classes != self.num_classes:
                raise DataError(f"task {self.name}: its {split} data holds {tuple(part.x.shape[1:])} examples of "
                                f"{data.num_classes} classes; the task declares {self.input_shape} and "
                                f"{self.num_classes}")
        return data

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


BUILTIN = ("digits", "cifar10")
register(Task("digits", num_classes=10, input_shape=(1, 8, 8),
              load_data=lambda _, o: load_digits(o.seed, o.test_fraction), default_location=None))
register(Task("cifar10", num_classes=10, input_shape=(3, 32, 32),
              load_data=lambda root, o: load_cifar10(root or Path("./data"), o.verify_checksums),
              default_location="./data", augment=crop_and_flip))
