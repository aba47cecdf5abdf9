"""The calibration set every INT8 path shares: class-balanced, seeded rows of a prepared store.

:func:`calibration_indices` picks the same number of samples of each class (so activation ranges
are not dominated by the largest class), and :class:`StoreReader` feeds them to onnxruntime's
calibrators as the graphs' inputs (``cign_runtime.manifest.feed``). Ten clips a class (100 for
avdigits) are enough: twenty gave the same agreement with fp32 (``calibration.quantize``).
"""
from __future__ import annotations

import warnings

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from cign_runtime.manifest import feed
from cign_train.data.store import PreparedStore


def calibration_indices(store: PreparedStore, store_classes, per_class: int = 10, seed: int = 0,
                        split: str = "train", notes: list[str] | None = None) -> np.ndarray:
    """Sorted sample indices: ``per_class`` seeded samples of ``split`` for each store class index.

    Each class draws from its own generator seeded by (seed, class), so a class's choice does not
    depend on the other classes asked for. A class with fewer samples gives all of them; that is
    said in a line appended to ``notes`` when given, else in a warning. Nothing is substituted.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    chosen = []
    for c in store_classes:
        c = int(c)
        pool = store.indices(split, [c])  # ascending
        if len(pool) < per_class:
            note = (f"class {c} ({store.classes[c]}): {len(pool)} {split} samples, fewer than "
                    f"per_class={per_class}; all {len(pool)} taken")
            if notes is None:
                warnings.warn(note, stacklevel=2)
            else:
                notes.append(note)
            chosen.append(pool)
        else:
            chosen.append(np.random.default_rng([seed, c]).choice(pool, per_class, replace=False))
    if not sum(map(len, chosen)):
        raise ValueError(f"no {split} samples of classes {list(store_classes)} in {store.root}")
    return np.sort(np.concatenate(chosen))


class StoreReader(CalibrationDataReader):
    """Feed dicts of ``indices`` in batches of ``batch_size``, plus ``tokens`` (K, D) when given.

    Reads stop at the end (``get_next`` returns None); :meth:`rewind` starts over, so one reader
    can calibrate several models.
    """

    def __init__(self, store: PreparedStore, indices: np.ndarray, batch_size: int = 1,
                 tokens: np.ndarray | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.tokens = tokens
        self.position = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.indices):
            return None
        idx = self.indices[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return feed(self.store.frames(idx), self.store.spectrograms(idx), self.tokens)

    def rewind(self) -> None:
        self.position = 0
