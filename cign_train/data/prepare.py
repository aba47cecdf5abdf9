"""Decode every listed clip once into a prepared store (multi-process, resumable, idempotent).

Workers decode with PyAV (:func:`cign_runtime.decode.decode_clip`), compute the log
spectrogram with the torch implementation of the spec, and write straight into the store's
memory maps; the parent only marks rows done. Killing and re-running resumes at the first
pending row; re-running a finished store with the same plan does nothing.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cign_runtime.spec import PreprocessSpec
from cign_train.data import store as st
from cign_runtime.decode import ClipError, decode_clip
from cign_train.data.definitions import Candidate, Rejection
from cign_train.preprocess import log_spectrogram

#: The order splits are listed in a summary (others follow).
SPLIT_ORDER = ["train", "val", "test"]
#: Rows decoded per task sent to a worker (amortises IPC without hurting the progress bar).
CHUNK = 8


@dataclass
class PrepareReport:
    root: Path
    stored: int
    rejected: list[Rejection]
    skipped: bool  # the store was already prepared from the same plan

    def summary(self) -> str:
        """What was stored, per split and per class (the counts a user checks first), and what was rejected."""
        store = st.PreparedStore(self.root)
        splits = sorted(set(store.splits.tolist()), key=lambda x: (SPLIT_ORDER + [x]).index(x))
        per_split = ", ".join(f"{split} {int((store.splits == split).sum())}" for split in splits)
        head = f"{self.root}: {'up to date' if self.skipped else 'stored'}, {self.stored} samples ({per_split})"
        reasons: dict[str, int] = {}
        for r in self.rejected:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        if reasons:
            listed = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            head += f"; {len(self.rejected)} rejected ({listed}), listed in {self.root / 'rejected.csv'}"
        width = max(len(c) for c in store.classes)
        rows = [f"  {'class':<{width}}" + "".join(f"{split:>7}" for split in splits)]
        for k, name in enumerate(store.classes):
            mine = store.splits[store.labels == k]
            rows.append(f"  {name:<{width}}" + "".join(f"{int((mine == split).sum()):>7}" for split in splits))
        return "\n".join([head, *rows])


_WORKER: dict = {}


def _init_worker(root: str, spec_json: str, capacity: int, min_audio_seconds: float, window: str) -> None:
    torch.set_num_threads(1)
    spec = PreprocessSpec.from_json(spec_json)
    frames, spectrograms = st.open_arrays(Path(root), spec, capacity, "r+")
    _WORKER.update(spec=spec, frames=frames, spectrograms=spectrograms, min_audio=min_audio_seconds, window=window)


def _prepare_rows(jobs: list[tuple[int, str]]) -> list[tuple[int, str | None, str, list[str]]]:
    """Decode ``(row, path)`` jobs into the store; returns (row, reason or None, detail, notes)."""
    spec: PreprocessSpec = _WORKER["spec"]
    results = []
    for row, path in jobs:
        try:
            clip = decode_clip(path, spec, _WORKER["min_audio"], _WORKER["window"])
        except ClipError as e:
            results.append((row, e.reason, e.detail, []))
            continue
        logspec = log_spectrogram(spec, torch.from_numpy(clip.audio)).numpy()
        _WORKER["frames"][row] = clip.frame
        _WORKER["spectrograms"][row] = logspec.astype(np.float16)
        results.append((row, None, "", clip.notes))
    _WORKER["frames"].flush()
    _WORKER["spectrograms"].flush()
    return results


def _dedupe(candidates: list[Candidate]) -> tuple[list[Candidate], list[Rejection]]:
    seen: set[str] = set()
    keep, rejected = [], []
    for c in candidates:
        if c.id in seen:
            rejected.append(Rejection(c.id, c.path, "duplicate id", "another listed clip has the same id"))
        else:
            seen.add(c.id)
            keep.append(c)
    return keep, rejected


def prepare_store(
    root: Path,
    dataset: str,
    spec: PreprocessSpec,
    classes: tuple[str, ...],
    candidates: list[Candidate],
    listing_rejected: list[Rejection] = (),
    workers: int | None = None,
    min_audio_seconds: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    window: str = "center",
) -> PrepareReport:
    """Prepare (or resume, or confirm) the store at ``root`` for ``candidates`` (``window``: see
    :func:`cign_runtime.decode.window_start`)."""
    candidates, duplicates = _dedupe(candidates)
    listing_rejected = list(listing_rejected) + duplicates
    plan = st.plan_document(dataset, spec, classes, candidates, window)
    root = Path(root)
    plan_path = root / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        if old.get("digest") != plan["digest"]:
            if not overwrite:
                raise FileExistsError(
                    f"{root}: holds a store prepared from different inputs or spec; pass --overwrite to rebuild it"
                )
            shutil.rmtree(root)
        elif (root / "index.json").is_file():
            done = st.PreparedStore(root)
            return PrepareReport(root, len(done), st.read_rejected(root / "rejected.csv"), skipped=True)
    root.mkdir(parents=True, exist_ok=True)
    capacity = max(1, len(candidates))
    if not plan_path.is_file():
        st.open_arrays(root, spec, capacity, "w+")  # allocate; workers fill the rows
        (root / "progress.tsv").unlink(missing_ok=True)
        st.write_json_atomic(plan_path, plan)

    progress_path = root / "progress.tsv"
    outcomes = _read_progress(progress_path)
    pending = [(i, c.path) for i, c in enumerate(candidates) if i not in outcomes]
    chunks = [pending[i : i + CHUNK] for i in range(0, len(pending), CHUNK)]
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(chunks) or 1))
    ctx = mp.get_context("spawn")
    bar = tqdm(total=len(candidates), initial=len(candidates) - len(pending), desc=f"prepare {dataset}",
               unit="clip", disable=not progress)
    with open(progress_path, "a", encoding="utf-8") as log, ctx.Pool(
        n_workers, _init_worker, (str(root), spec.to_json(), capacity, min_audio_seconds, window)
    ) as pool:
        for results in pool.imap_unordered(_prepare_rows, chunks):
            for row, reason, detail, notes in results:
                outcomes[row] = (reason, detail, notes)
                fields = [str(row), reason or "", detail, " | ".join(notes)]
                log.write("\t".join(" ".join(f.split()) for f in fields) + "\n")
            log.flush()
            bar.update(len(results))
    bar.close()
    return _finish(root, dataset, spec, classes, candidates, listing_rejected, outcomes, capacity)


def _read_progress(path: Path) -> dict[int, tuple[str | None, str, list[str]]]:
    """Finished rows; a line cut short by a kill lacks its newline and is redone."""
    outcomes: dict[int, tuple[str | None, str, list[str]]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            row, reason, detail, notes = line.rstrip("\n").split("\t")
            outcomes[int(row)] = (reason or None, detail, [n for n in notes.split(" | ") if n])
    return outcomes


def _finish(root, dataset, spec, classes, candidates, listing_rejected, outcomes, capacity) -> PrepareReport:
    class_index = {name: i for i, name in enumerate(classes)}
    rejected = list(listing_rejected)
    samples: dict[str, list] = {"id": [], "label": [], "split": [], "row": [], "notes": []}
    for row, c in enumerate(candidates):
        reason, detail, notes = outcomes[row]
        if reason:
            rejected.append(Rejection(c.id, c.path, reason, detail))
            continue
        samples["id"].append(c.id)
        samples["label"].append(class_index[c.label])
        samples["split"].append(c.split)
        samples["row"].append(row)
        samples["notes"].append(notes)
    st.write_rejected(root / "rejected.csv", rejected)
    index = {
        "format": st.FORMAT,
        "version": st.VERSION,
        "dataset": dataset,
        "spec": spec.to_dict(),
        "classes": list(classes),
        "capacity": capacity,
        "counts": {s: samples["split"].count(s) for s in sorted(set(samples["split"]))},
        "rejected": len(rejected),
        "samples": samples,
    }
    st.write_json_atomic(root / "index.json", index)
    return PrepareReport(root, len(samples["id"]), rejected, skipped=False)
