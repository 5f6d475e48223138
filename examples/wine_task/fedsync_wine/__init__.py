"""An example fedsync task that lives outside fedsync: scikit-learn's bundled wine recognition data (178 wines,
13 chemical measurements each, 3 cultivars; no download) and a small MLP.

Install it on every machine of a run (`pip install examples/wine_task`), then name it in the config, by its entry
point (`task: wine`) or by reference (`task: fedsync_wine:TASK`). examples/wine_task/wine.yaml is a whole config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsync.learning.data import Dataset, Split
from fedsync.learning.tasks import DataOptions, Task

__version__ = "0.1.0"
HIDDEN = 32


def load(location: Path | None, options: DataOptions) -> Dataset:
    """The whole set, held out by the run's seed and test_fraction, standardised with the training part's
    statistics. `location` is unused: the data ships inside scikit-learn."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(options.seed).permutation(len(y))
    n_test = round(len(y) * options.test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)

    def split(idx: np.ndarray) -> Split:
        return Split(torch.tensor((x[idx] - mean) / std, dtype=torch.float32), torch.tensor(y[idx]))

    return Dataset(train=split(train), test=split(test), num_classes=3)


def mlp(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(13, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))


TASK = Task("wine", num_classes=3, input_shape=(13,), load_data=load, default_location=None,
            models={"mlp": mlp}, version=__version__)
