"""Per-sample seeded randomness, so that augmentation depends only on (seed, epoch, index).

This makes a run reproducible regardless of the number of data-loader workers or processes,
and lets a resumed run see exactly the augmentations an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed is ~20x slower
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the body with torch (CPU)/python/numpy global RNGs seeded, then restore their states.

    Inside a data-loader worker the global RNGs belong to that worker alone, so they are only
    seeded (saving and restoring them would cost more than the augmentation itself).
    """
    if get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    _seed_all(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
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
