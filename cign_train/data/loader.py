"""Torch access to a prepared store: whole batches per read, normalisation left to the device.

:class:`StoreBatches` is a map-style dataset indexed by a *list* of sample indices (one batch):
it reads the rows in sorted order from the memory maps in one fancy-indexing call and returns
uint8 frames and float16 spectrograms, the smallest tensors to move to a GPU. Normalise there
with :mod:`cign_train.preprocess`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
    get_worker_info,
)

from cign_train.data.store import PreparedStore


class Batch(NamedTuple):
    frames: torch.Tensor  # (B, H, W, 3) uint8
    spectrograms: torch.Tensor  # (B, n_freq, n_time) float16, un-normalised log power
    labels: torch.Tensor  # (B,) int64 class index in the store's class order
    index: torch.Tensor  # (B,) int64 sample index in the store

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in self))


class StoreBatches(Dataset):
    """Batches of ``store`` samples drawn from ``indices``; ``dataset[[i, j, ...]]`` is one batch."""

    def __init__(self, store: PreparedStore, indices):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions) -> Batch:
        idx = np.sort(self.indices[np.asarray(positions, dtype=np.int64)])
        spec = self.store.spec
        frames = torch.empty((len(idx), *spec.frame_shape), dtype=torch.uint8)
        spectrograms = torch.empty((len(idx), *spec.spectrogram_shape), dtype=torch.float16)
        if get_worker_info() is not None:
            # Read straight into shared memory: the batch then crosses to the main process uncopied.
            frames.share_memory_()
            spectrograms.share_memory_()
        self.store.frames(idx, out=frames.numpy())
        self.store.spectrograms(idx, out=spectrograms.numpy())
        return Batch(frames, spectrograms, torch.from_numpy(self.store.labels[idx]), torch.from_numpy(idx))


def batch_loader(
    store: PreparedStore,
    indices,
    batch_size: int,
    shuffle: bool,
    workers: int = 2,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world: int = 1,
    weights=None,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` es; shuffling is seeded so runs repeat.

    With ``world`` > 1 each rank reads its own shard (torch's DistributedSampler, seeded alike).
    ``weights`` (one per index) switch to drawing ceil(len(indices) / world) samples per rank with
    replacement, in proportion to the weights (torch's WeightedRandomSampler, each rank its own seed).
    """
    data = StoreBatches(store, indices)
    if weights is not None:
        if len(weights) != len(data):
            raise ValueError(f"{len(weights)} weights for {len(data)} indices")
        order = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.float64), math.ceil(len(data) / world),
                                      replacement=True, generator=torch.Generator().manual_seed(seed * world + rank))
    elif world > 1:
        order = DistributedSampler(data, world, rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        order = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    else:
        order = SequentialSampler(data)
    return DataLoader(
        data,
        sampler=BatchSampler(order, batch_size, drop_last),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
    )
