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

#: A training epoch's last batch with fewer clips than min(MIN_BATCH, half a batch) joins the batch before it.
MIN_BATCH = 8
#: What ``batch_loader`` does with an epoch's last, short batch.
LAST_BATCH = ("keep", "fold", "drop")


def folded_sizes(n: int, batch_size: int) -> list[int]:
    """Batch sizes of an epoch over ``n`` clips when the last batch is folded: batches of ``batch_size``,
    the last one joined to the one before when it holds fewer than min(MIN_BATCH, ceil(batch_size / 2))
    clips.

    Training never takes a step on a batch of a few clips: oneDNN's bf16 convolution weight-gradient
    returned NaN on some CPUs at batches of 1 and 5 clips (never at 2 or 16; ``cign_train.guard``), and
    BatchNorm's batch statistics from a few clips are noise (Wu & He 2018 measure BatchNorm's error
    rising steeply below 8 images per batch). Folding rather than dropping keeps every clip in every
    epoch (a task of 20 clips at batch 16 would lose 4 of them, one of fewer than 16 clips all of them)
    and costs at most one batch of ``batch_size + min(7, ceil(batch_size / 2) - 1)`` clips per epoch.
    """
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < min(MIN_BATCH, math.ceil(batch_size / 2)):
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def batches_per_epoch(n_clips: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps of one training epoch over ``n_clips`` on each of ``world`` ranks (``batch_loader``
    with ``last="fold"`` gives each rank ceil(n / world) clips, in :func:`folded_sizes`)."""
    return len(folded_sizes(math.ceil(n_clips / world), batch_size))


class FoldedBatchSampler(BatchSampler):
    """torch's BatchSampler whose last batch joins the one before it when it is short (:func:`folded_sizes`)."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self):
        batches = list(super().__iter__())
        if len(batches) > 1 and len(folded_sizes(len(self.sampler), self.batch_size)) < len(batches):
            batches[-2:] = [batches[-2] + batches[-1]]
        return iter(batches)

    def __len__(self) -> int:
        return len(folded_sizes(len(self.sampler), self.batch_size))


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
    last: str = "keep",
    rank: int = 0,
    world: int = 1,
    weights=None,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` es; shuffling is seeded so runs repeat.

    With ``world`` > 1 each rank reads its own shard (torch's DistributedSampler, seeded alike).
    ``weights`` (one per index) switch to drawing ceil(len(indices) / world) samples per rank with
    replacement, in proportion to the weights (torch's WeightedRandomSampler, each rank its own seed).
    ``last`` is what becomes of an epoch's last, short batch (one of :data:`LAST_BATCH`): kept as it is,
    folded into the batch before it when it is a few clips (:func:`folded_sizes`; training), or dropped.
    """
    if last not in LAST_BATCH:
        raise ValueError(f"last must be one of {LAST_BATCH}, got {last!r}")
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
        sampler=(FoldedBatchSampler(order, batch_size) if last == "fold"
                 else BatchSampler(order, batch_size, drop_last=last == "drop")),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
    )
