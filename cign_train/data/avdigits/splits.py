"""Held-out conditions: disjoint image pools per split and disjoint train / held-out voice pools.

Train clips use train images and train voices. Val and test clips use their own image pools
(disjoint from each other and from train) and the held-out voice variants, so validation
measures the same unseen-speaker gap as test while never showing a test image.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .config import CLASSES, SPLITS, AvdigitsConfig
from .scene import digit_images
from .speech import VARIANTS

_POOL_STREAM = 0  # seed-sequence key for the pools; clips use (1, clip index)


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """Independent random stream for ``key`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class Pools:
    """Per split: image indices per class (into sklearn's digits) and voice variants."""

    images: dict[str, tuple[np.ndarray, ...]]
    variants: dict[str, tuple[str, ...]]


@functools.cache
def pools(config: AvdigitsConfig, seed: int) -> Pools:
    """Split every class's images by ``config.image_split`` and the voice variants into pools."""
    rng = rng_for(seed, _POOL_STREAM)
    _, labels = digit_images()
    images: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(config.image_split)[:-1] * len(members)).astype(int)
        for split, part in zip(SPLITS, np.split(members, cuts)):
            images[split].append(np.sort(part))
    shuffled = [VARIANTS[i] for i in rng.permutation(len(VARIANTS))]
    n_heldout = int(round(config.heldout_voices * len(VARIANTS)))
    train_variants, heldout = tuple(sorted(shuffled[n_heldout:])), tuple(sorted(shuffled[:n_heldout]))
    return Pools(
        images={split: tuple(parts) for split, parts in images.items()},
        variants={"train": train_variants, "val": heldout, "test": heldout},
    )


@dataclass(frozen=True)
class Clip:
    """One row of the index: clip ``index`` is ``id`` in ``split`` with class ``label``."""

    index: int
    split: str
    label: int

    @property
    def id(self) -> str:
        return f"avd{self.index:05d}"

    @property
    def start(self) -> int:
        """VGGSound-style start second of the clip in its source (always 0 here)."""
        return 0

    @property
    def filename(self) -> str:
        return f"{self.id}_{self.start:06d}.mp4"


def plan(config: AvdigitsConfig) -> list[Clip]:
    """All clips, split by split, classes interleaved so any prefix of a split is balanced."""
    clips: list[Clip] = []
    for split in SPLITS:
        for _ in range(config.per_class(split)):
            for label in range(len(CLASSES)):
                clips.append(Clip(len(clips), split, label))
    return clips
