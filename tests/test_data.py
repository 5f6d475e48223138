"""The embedded digits are scikit-learn's, read from its bundled file without importing it."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits as sklearn_digits

from fedsync.learning.data import load_digits


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
