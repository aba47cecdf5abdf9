"""Rehearsal buffer: a fixed number of exemplars per class, kept as prepared-store sample indices.

The store is memory-mapped and holds un-augmented spectrograms and frames, so keeping a sample's
index is the same as keeping its raw inputs (Mammoth's buffer stores non-augmented inputs too) and
costs no copies. CIGN keeps "50 audio-visual pairs per category from old tasks": a fixed quota per
class, not a fixed total, so the buffer grows with the number of classes seen.

Selection, per class, at the end of each task:

* ``random``: a seeded choice without replacement; the generator is seeded with ``(seed, class)``
  and draws from the class's samples sorted by store index, so the result depends only on the seed,
  the class and the set of its samples.
* ``herding``: iCaRL herding (Rebuffi et al. CVPR 2017, Algorithm 4): L2-normalise the features,
  then greedily add the sample that brings the mean of the chosen features closest to the class
  mean, without replacement. Ties go to the lower store index. Exemplars keep their selection order.
"""
from __future__ import annotations

import numpy as np

SELECTIONS = ("random", "herding")


def herding_order(features: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` rows of ``features`` (N, D) in iCaRL herding order."""
    phi = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (N, D)
    target = phi.mean(axis=0)  # (D,)
    chosen: list[int] = []
    running = np.zeros_like(target)  # sum of the chosen features
    free = np.ones(len(phi), dtype=bool)
    for step in range(1, k + 1):
        dist = np.linalg.norm(target - (running + phi) / step, axis=1)  # (N,) mean if each were added
        dist[~free] = np.inf
        pick = int(np.argmin(dist))
        chosen.append(pick)
        running += phi[pick]
        free[pick] = False
    return np.asarray(chosen, dtype=np.int64)


class RehearsalBuffer:
    """Up to ``per_class`` exemplar indices for every class seen so far."""

    def __init__(self, per_class: int, select: str = "random", seed: int = 0):
        if select not in SELECTIONS:
            raise ValueError(f"unknown selection {select!r}; valid: {', '.join(SELECTIONS)}")
        if int(per_class) < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        self.per_class = int(per_class)
        self.select = select
        self.seed = int(seed)
        self._exemplars: dict[int, np.ndarray] = {}  # class -> store indices in selection order

    def update(self, indices, labels, features=None) -> None:
        """Select exemplars for every class in ``labels``, replacing those of classes already kept.

        ``indices`` and ``labels`` are the task's training samples (store indices, class ids);
        ``features`` (N, D) are needed by herding and ignored by random selection.
        """
        indices = np.asarray(indices, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if indices.ndim != 1 or indices.shape != labels.shape:
            raise ValueError(f"indices {indices.shape} and labels {labels.shape} must be matching 1-D arrays")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("indices contain duplicates")
        if self.select == "herding":
            if features is None:
                raise ValueError("herding selection needs the samples' feature vectors (features=None given)")
            features = np.asarray(features, dtype=np.float64)
            if features.ndim != 2 or len(features) != len(indices):
                raise ValueError(f"features must be ({len(indices)}, D), got {features.shape}")
        for cls in np.unique(labels):
            rows = np.flatnonzero(labels == cls)
            rows = rows[np.argsort(indices[rows], kind="stable")]  # store-index order: input order is irrelevant
            k = min(self.per_class, len(rows))
            if self.select == "herding":
                picked = herding_order(features[rows], k)
            else:
                picked = np.random.default_rng((self.seed, int(cls))).choice(len(rows), size=k, replace=False)
            self._exemplars[int(cls)] = indices[rows[picked]]

    @property
    def classes(self) -> np.ndarray:
        return np.asarray(sorted(self._exemplars), dtype=np.int64)

    @property
    def indices(self) -> np.ndarray:
        """Store indices of all exemplars, grouped by class (ascending), in selection order within a class."""
        parts = [self._exemplars[c] for c in sorted(self._exemplars)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Class of each entry of ``indices``."""
        counts = [len(self._exemplars[c]) for c in sorted(self._exemplars)]
        return np.repeat(self.classes, counts).astype(np.int64)

    def __len__(self) -> int:
        return sum(len(v) for v in self._exemplars.values())

    def state_dict(self) -> dict:
        """Settings and contents as plain Python values (safe for JSON and ``torch.load(weights_only=True)``)."""
        classes = sorted(self._exemplars)
        return {"per_class": self.per_class, "select": self.select, "seed": self.seed,
                "classes": classes, "indices": [self._exemplars[c].tolist() for c in classes]}

    def load_state_dict(self, state: dict) -> None:
        """Restore settings and contents from ``state_dict()``; the checkpoint's settings win."""
        if state["select"] not in SELECTIONS:
            raise ValueError(f"unknown selection {state['select']!r}; valid: {', '.join(SELECTIONS)}")
        if len(state["classes"]) != len(state["indices"]):
            raise ValueError("buffer state has a different number of classes and index lists")
        self.per_class = int(state["per_class"])
        self.select = state["select"]
        self.seed = int(state["seed"])
        self._exemplars = {int(c): np.asarray(ix, dtype=np.int64)
                           for c, ix in zip(state["classes"], state["indices"])}
