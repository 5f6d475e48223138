"""The embedded digits are scikit-learn's, read from its bundled file without importing it; tasks hold what they
declare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from fedsync.base.errors import ConfigError, DataError
from fedsync.learning.data import load_digits
from fedsync.learning.tasks import TASKS, DataOptions, Task, get_task, register


def test_digits_are_exactly_scikit_learns() -> None:
    ours = load_digits(seed=3, test_fraction=0.25)
    theirs = sklearn_digits()
    order = np.random.default_rng(3).permutation(len(theirs.target))
    n_test = int(round(len(order) * 0.25))
    x = torch.tensor(theirs.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(theirs.target)
    assert torch.equal(ours.test.x, x[order[:n_test]]) and torch.equal(ours.test.y, y[order[:n_test]])
    assert torch.equal(ours.train.x, x[order[n_test:]]) and torch.equal(ours.train.y, y[order[n_test:]])
    assert ours.num_classes == 10 and len(ours.train) + len(ours.test) == 1797


def test_tasks_are_registered_and_checked_against_what_they_declare() -> None:
    assert {"digits", "cifar10"} <= set(TASKS)
    with pytest.raises(ConfigError, match="not one of"):
        get_task("imagenet")
    options = DataOptions(seed=3, test_fraction=0.25, verify_checksums=True)
    digits = get_task("digits")
    shaped_wrong = register(Task("digits-as-rgb", num_classes=10, input_shape=(3, 8, 8),
                                 load_data=digits.load_data, default_location=None))
    try:
        assert get_task("digits-as-rgb") is shaped_wrong  # a task from outside the package, by the same hook
        with pytest.raises(DataError, match=r"holds \(1, 8, 8\) examples"):
            shaped_wrong.load(None, options)
    finally:
        del TASKS["digits-as-rgb"]
    model = digits.build_model("digits_cnn", seed=0)
    assert model(digits.load(None, options).test.x[:2]).shape == (2, digits.num_classes)


def test_the_wide_digits_model_learns_digits() -> None:
    """digits_mlp (1.1 M parameters) is a real model of the task, not only a size for benchmarks."""
    from fedsync.learning.train import TrainSettings, evaluate, local_train

    digits = get_task("digits")
    data = digits.load(None, DataOptions(seed=0, test_fraction=0.2, verify_checksums=True))
    model = digits.build_model("digits_mlp", seed=0)
    assert sum(p.numel() for p in model.parameters()) == 1_126_410
    local_train(model, data.train, TrainSettings(epochs=3, steps=None, batch_size=32, lr=0.05, momentum=0.9,
                                                 weight_decay=0.0, augment=None), "cpu", seed=0)
    assert evaluate(model, data.test, 256)[1] > 0.9
