"""Per-sample seeded randomness, so that augmentation depends only on (seed, epoch, index).

This makes a run reproducible regardless of the number of data-loader workers or processes,
and lets a resumed run see exactly the augmentations an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset


@contextlib.contextmanager
def seeded(seed: int):
    """Run the body with torch/python/numpy global RNGs seeded, then restore their states."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Wraps a dataset so item ``i`` in epoch ``e`` is produced under seed f(seed, e, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        mixed = (self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + index
        with seeded(mixed % 2**63):
            return self.dataset[index]

    def __getattr__(self, name):  # expose the wrapped dataset's attributes (classes, ...)
        if name in {"dataset", "seed", "epoch"}:
            raise AttributeError(name)
        return getattr(self.dataset, name)
