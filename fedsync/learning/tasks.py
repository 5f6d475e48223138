"""Tasks: what is learned, bundled so that a run names it in one word. A task knows how to load its data on
*this* machine (from a location that machine gives: `--data-root`, else the run config's `data_root`), its
classes and input shape, the models it builds and its augmentation. The built-in tasks are registered here
like any other; `register` is the hook for tasks from outside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedsync.base.errors import ConfigError, DataError
from fedsync.learning import models
from fedsync.learning.augment import crop_and_flip
from fedsync.learning.data import Dataset, load_cifar10, load_digits
from fedsync.learning.train import Augment


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

    def build_model(self, name: str, seed: int | None = None) -> nn.Module:
        return models.build_model(name, self.num_classes, seed)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task; an unknown name is a config error."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


register(Task("digits", num_classes=10, input_shape=(1, 8, 8),
              load_data=lambda _, o: load_digits(o.seed, o.test_fraction), default_location=None))
register(Task("cifar10", num_classes=10, input_shape=(3, 32, 32),
              load_data=lambda root, o: load_cifar10(root or Path("./data"), o.verify_checksums),
              default_location="./data", augment=crop_and_flip))
