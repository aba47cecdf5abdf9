"""The prepared store: memory-mapped arrays plus a JSON index (numpy only, no torch).

Layout of a store folder::

    plan.json         what is being prepared: spec, classes, candidate clips (written first)
    frames.u8         (capacity, H, W, 3) uint8 RGB frames, one row per candidate
    spectrograms.f16  (capacity, n_freq, n_time) float16 log spectrograms (un-normalised)
    progress.tsv      one line per decoded candidate: row, rejection reason or empty, detail, notes
    rejected.csv      id,path,reason,detail of every clip that could not become a sample
    index.json        written last: spec, classes, and per sample id, label, split, row, notes

A row of a rejected candidate stays unused, so resuming never moves data. ``index.json`` exists
only for a finished store; its presence with an identical plan makes preparation a no-op.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cign_runtime.spec import PreprocessSpec
from cign_train.data.definitions import Candidate, Rejection

FORMAT = "cign-prepared-store"
VERSION = 1


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def plan_document(dataset: str, spec: PreprocessSpec, classes, candidates: list[Candidate],
                  window: str = "center") -> dict:
    """What a store is prepared from; its digest decides whether a store on disk is this one. The
    window choice is recorded only when it is not the default ``center`` (stores from before it existed
    stay valid)."""
    body = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "spec": spec.to_dict(),
        "classes": list(classes),
        "candidates": [asdict(c) for c in candidates],
    }
    if window != "center":
        body["window"] = window
    body["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body


def open_arrays(root: Path, spec: PreprocessSpec, capacity: int, mode: str):
    """(frames, spectrograms) memmaps of a store with ``capacity`` rows."""
    frames = np.memmap(root / "frames.u8", np.uint8, mode, shape=(capacity, *spec.frame_shape))
    spectrograms = np.memmap(root / "spectrograms.f16", np.float16, mode, shape=(capacity, *spec.spectrogram_shape))
    return frames, spectrograms


def read_rejected(path: Path) -> list[Rejection]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [Rejection(r["id"], r["path"], r["reason"], r["detail"]) for r in csv.DictReader(f)]


def write_rejected(path: Path, rejected: list[Rejection]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "reason", "detail"])
        for r in rejected:
            w.writerow([r.id, r.path, r.reason, r.detail])
    os.replace(tmp, path)


class PreparedStore:
    """Read-only view of a finished store: ``frames[i]``, ``spectrograms[i]``, ``labels[i]`` per sample."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no finished prepared store here (run cign-prepare)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_path}: not a {FORMAT} v{VERSION} index")
        self.index = index
        self.dataset: str = index["dataset"]
        self.spec = PreprocessSpec.from_dict(index["spec"])
        self.classes: tuple[str, ...] = tuple(index["classes"])
        samples = index["samples"]
        self.ids: list[str] = samples["id"]
        self.labels = np.asarray(samples["label"], dtype=np.int64)
        self.splits = np.asarray(samples["split"])
        self.rows = np.asarray(samples["row"], dtype=np.int64)
        self._frames, self._spectrograms = open_arrays(self.root, self.spec, index["capacity"], "r")

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str | None = None, classes=None) -> np.ndarray:
        """Sample indices of ``split`` (all splits if None) whose label is in ``classes`` (all if None)."""
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            keep &= self.splits == split
        if classes is not None:
            keep &= np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))
        return np.flatnonzero(keep)

    def frames(self, idx, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (…, H, W, 3) frames of sample indices ``idx`` (sorted row order reads fastest)."""
        return np.take(self._frames, self.rows[idx], axis=0, out=out)

    def spectrograms(self, idx, out: np.ndarray | None = None) -> np.ndarray:
        """float16 (…, n_freq, n_time) log spectrograms of sample indices ``idx``."""
        return np.take(self._spectrograms, self.rows[idx], axis=0, out=out)
