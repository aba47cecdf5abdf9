"""From a data set name and the user's files to a prepared store under ``data_dir``.

Folder layout: ``{data_dir}/{dataset}/prepared/{preset}/`` holds the store; ``avdigits`` also
keeps its generated clips in ``{data_dir}/avdigits/clips/`` and its index in
``{data_dir}/avdigits/avdigits.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cign_runtime.spec import get_preset
from cign_train.data import avdigits
from cign_train.data import definitions as defs
from cign_train.data.prepare import PrepareReport, prepare_store
from cign_train.data.store import PreparedStore


@dataclass
class Sources:
    """The user's inputs for a data set (which ones are needed depends on the data set)."""

    index: Path | None = None  # vggsound.csv (VGGSound family) or file,label[,split] CSV (csv)
    clips_dir: Path | None = None
    splits_dir: Path | None = None  # VGGSound-Instruments official split files
    classes_file: Path | None = None  # csv: class names in task order
    name: str | None = None  # csv: store folder name (default: the CSV's stem)


def store_dir(data_dir: Path, dataset: str, preset: str) -> Path:
    return Path(data_dir) / dataset / "prepared" / preset


def _require(value, flag: str, dataset: str):
    if value is None:
        raise ValueError(f"--dataset {dataset} needs {flag}")
    return Path(value)


def prepare_dataset(
    dataset: str,
    data_dir: Path,
    sources: Sources | None = None,
    preset: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    min_audio_seconds: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    window: str = "center",
) -> PrepareReport:
    """Build (or resume, or confirm) the prepared store of ``dataset``; returns the report. avdigits'
    store is derived from its generated clips, so one prepared from other inputs or with another spec
    (a preset changed since) is rebuilt without ``overwrite``; other data sets ask for it."""
    sources = sources or Sources()
    listing_rejected: list[defs.Rejection] = []
    if dataset == "csv":
        index = _require(sources.index, "--index (a CSV with columns file,label[,split])", dataset)
        classes, candidates, listing_rejected = defs.csv_candidates(index, sources.clips_dir, seed, sources.classes_file)
        name, preset = sources.name or index.stem, preset or "paper"
    else:
        definition = defs.get_definition(dataset)
        name, preset, classes = dataset, preset or definition.preset, definition.classes
        if dataset == "avdigits":
            overwrite = True
            root = Path(data_dir) / "avdigits"
            index = avdigits.generate(root, seed=seed, workers=workers, progress=progress)
            candidates, listing_rejected = defs.avdigits_candidates(index, root / "clips")
        else:
            candidates, listing_rejected = defs.vggsound_family_candidates(
                definition, sources.clips_dir, sources.index, sources.splits_dir, seed)
    return prepare_store(
        store_dir(data_dir, name, preset),
        name,
        get_preset(preset),
        classes,
        candidates,
        listing_rejected,
        workers=workers,
        min_audio_seconds=min_audio_seconds,
        overwrite=overwrite,
        progress=progress,
        window=window,
    )


def ensure_avdigits(data_dir: Path, spec: str, progress: bool = True) -> None:
    """Generate and prepare the embedded avdigits store of preset ``spec`` when it is missing, or prepare it
    again when it was prepared with another spec than the preset's (a preset changed since): avdigits is
    derived data, so the stale store is replaced, not trained on. The commands call it before training."""
    root = store_dir(Path(data_dir), "avdigits", spec)
    if (root / "index.json").is_file():
        if PreparedStore(root).spec == get_preset(spec):
            return
        tqdm.write(f"{root}: prepared with another {spec!r} spec than the preset's now; preparing it again")
    prepare_dataset("avdigits", Path(data_dir), preset=spec, progress=progress)
