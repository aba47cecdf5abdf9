"""Data set definitions (class lists in task order) and the clip lists they are ingested from.

A definition is a fact list shipped with the package: VGGSound labels in the task order of each
benchmark. Ingestion turns the user's index files into :class:`Candidate` clips. Splits: the
paper splits every data set 80/10/10 into train/val/test (Sec. 4.1); where no official split is
given we do that per class with a seeded shuffle of the listed rows (VGGSound's own train/test
column is ignored). Rows of other VGGSound classes are out of scope and skipped; a row whose
label is not a class of the data set where one is required (a split file, ``avdigits``, a CSV
with ``--classes``) is rejected as ``unknown label``.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SPLITS = ("train", "val", "test")
#: The paper's split of every data set (Sec. 4.1), in the order of ``SPLITS``.
SPLIT_RATIOS = (0.8, 0.1, 0.1)
#: The embedded ``avdigits`` data set: spoken + handwritten digits, class index = digit.
AVDIGITS_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Candidate:
    """One listed clip before decoding."""

    id: str
    path: str
    label: str
    split: str


@dataclass(frozen=True)
class Rejection:
    id: str
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class DatasetDefinition:
    name: str
    classes: tuple[str, ...]  # labels in task order
    tasks: int  # default number of equal-size tasks
    preset: str  # default preprocessing preset
    short_names: tuple[str, ...] | None = None

    def task_classes(self, tasks: int | None = None) -> list[list[int]]:
        """Class indices of each task: ``tasks`` equal consecutive blocks of the class order."""
        tasks = tasks or self.tasks
        if tasks < 1 or len(self.classes) % tasks:
            raise ValueError(f"{self.name}: {len(self.classes)} classes do not split into {tasks} equal tasks")
        size = len(self.classes) // tasks
        return [list(range(t * size, (t + 1) * size)) for t in range(tasks)]


def _package_lines(name: str) -> list[str]:
    text = resources.files("cign_train.data").joinpath("definitions", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _vgginstruments() -> DatasetDefinition:
    rows = list(csv.DictReader(_package_lines("vgginstruments_classes.csv")))
    return DatasetDefinition(
        name="vgginstruments",
        classes=tuple(r["vggsound_label"] for r in rows),
        short_names=tuple(r["name"] for r in rows),
        tasks=4,
        preset="paper",
    )


def get_definition(name: str) -> DatasetDefinition:
    """The built-in definition ``name`` (``csv`` data sets have none: their labels define them)."""
    if name == "avdigits":
        return DatasetDefinition("avdigits", AVDIGITS_CLASSES, tasks=5, preset="cpu")
    if name == "vgginstruments":
        return _vgginstruments()
    if name == "vggsound100":
        # Paper protocol: 4 tasks x 25 classes; the AV-CIL order also reads as 10 x 10.
        return DatasetDefinition("vggsound100", tuple(_package_lines("vggsound100_classes.txt")), 4, "paper")
    if name == "vggss":
        return DatasetDefinition("vggss", tuple(_package_lines("vggss_classes.txt")), 4, "paper")
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")


DATASETS = ("avdigits", "vgginstruments", "vggsound100", "vggss", "csv")


def vggsound_clip_id(youtube_id: str, start: int) -> str:
    return f"{youtube_id}_{int(start):06d}"


def parse_vggsound_clip_id(clip_id: str) -> tuple[str, int]:
    """``(youtube_id, start_seconds)`` of a clip id made by :func:`vggsound_clip_id`."""
    youtube_id, _, start = clip_id.rpartition("_")
    if not youtube_id or not start.isdigit():
        raise ValueError(f"{clip_id!r} is not a VGGSound clip id youtube_id_start")
    return youtube_id, int(start)


def read_vggsound_csv(path: Path) -> list[tuple[str, int, str, str]]:
    """Rows ``(youtube_id, start_seconds, label, split)`` of a VGGSound-format index (no header)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 4:
                raise ValueError(f"{path}:{n}: expected 4 fields youtube_id,start_seconds,label,split, got {row}")
            try:
                start = int(float(row[1]))
            except ValueError:
                raise ValueError(f"{path}:{n}: start_seconds {row[1]!r} is not a number") from None
            rows.append((row[0].strip(), start, row[2].strip(), row[3].strip()))
    return rows


def seeded_split(items: list[Candidate], seed: int, ratios=SPLIT_RATIOS) -> list[Candidate]:
    """Assign train/val/test per label: a seeded shuffle, then the first 80% / next 10% / rest."""
    by_label: dict[str, list[Candidate]] = {}
    for c in items:
        by_label.setdefault(c.label, []).append(c)
    out = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda c: c.id)
        random.Random(f"{seed}:{label}").shuffle(group)
        n_train = round(len(group) * ratios[0])
        n_val = round(len(group) * ratios[1])
        for i, c in enumerate(group):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            out.append(Candidate(c.id, c.path, c.label, split))
    return sorted(out, key=lambda c: c.id)


def vggsound_candidates(
    definition: DatasetDefinition, index_csv: Path, clips_dir: Path, seed: int
) -> tuple[list[Candidate], int]:
    """Clips of ``definition``'s classes listed in a VGGSound index, and how many rows were out of scope."""
    wanted = set(definition.classes)
    found, skipped = [], 0
    for yid, start, label, _ in read_vggsound_csv(index_csv):
        if label not in wanted:
            skipped += 1
            continue
        cid = vggsound_clip_id(yid, start)
        found.append(Candidate(cid, str(clips_dir / f"{cid}.mp4"), label, ""))
    return seeded_split(found, seed), skipped


def split_file_candidates(
    definition: DatasetDefinition, splits_dir: Path, clips_dir: Path
) -> tuple[list[Candidate], list[Rejection]]:
    """VGGSound-Instruments' official split: ``group_{t}_{split}.txt`` lines ``youtubeid_start,name``.

    Lines ``-,name`` are placeholders of the reference release and are skipped.
    """
    by_short = dict(zip(definition.short_names or (), definition.classes))
    out, rejected = [], []
    for t in range(definition.tasks):
        for split in SPLITS:
            path = splits_dir / f"group_{t}_{split}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: official split file is missing")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                cid, _, short = line.strip().rpartition(",")
                if cid == "-":
                    continue
                clip = str(clips_dir / f"{cid}.mp4")
                if short not in by_short:
                    rejected.append(Rejection(cid, clip, "unknown label", f"{path.name}:{n}: {short!r} is not a class"))
                    continue
                out.append(Candidate(cid, clip, by_short[short], split))
    return out, rejected


def vggsound_family_candidates(
    definition: DatasetDefinition, clips_dir: Path | None, index_csv: Path | None, splits_dir: Path | None,
    seed: int = 0,
) -> tuple[list[Candidate], list[Rejection]]:
    """The listed clips of a VGGSound-family data set: VGGSound-Instruments' official split when
    ``splits_dir`` is given, else the data set's rows of the VGGSound index (seeded split)."""
    official = definition.name == "vgginstruments" and splits_dir is not None
    if index_csv is None and not official:
        raise ValueError(f"--dataset {definition.name} needs --index (VGGSound's vggsound.csv)")
    if clips_dir is None:
        raise ValueError(f"--dataset {definition.name} needs --clips-dir")
    if official:
        return split_file_candidates(definition, Path(splits_dir), Path(clips_dir))
    candidates, _ = vggsound_candidates(definition, Path(index_csv), Path(clips_dir), seed)
    return candidates, []


def labelled_candidates(
    rows: list[tuple[str, str, str, str]], classes: tuple[str, ...], source: Path
) -> tuple[list[Candidate], list[Rejection]]:
    """Rows ``(id, path, label, split)`` checked against ``classes``."""
    known = set(classes)
    out, rejected = [], []
    for cid, path, label, split in rows:
        if label not in known:
            rejected.append(Rejection(cid, path, "unknown label", f"{source}: {label!r} is not a class"))
        elif split not in SPLITS:
            rejected.append(Rejection(cid, path, "unknown split", f"{source}: {split!r} is not one of {SPLITS}"))
        else:
            out.append(Candidate(cid, path, label, split))
    return out, rejected


def avdigits_candidates(index_csv: Path, clips_dir: Path) -> tuple[list[Candidate], list[Rejection]]:
    """The generated ``avdigits`` index (VGGSound format, splits given)."""
    rows = []
    for yid, start, label, split in read_vggsound_csv(index_csv):
        cid = vggsound_clip_id(yid, start)
        rows.append((cid, str(clips_dir / f"{cid}.mp4"), label, split))
    return labelled_candidates(rows, get_definition("avdigits").classes, index_csv)


def csv_candidates(
    index_csv: Path, clips_dir: Path | None, seed: int, classes_file: Path | None = None
) -> tuple[tuple[str, ...], list[Candidate], list[Rejection]]:
    """A user CSV with header ``file,label[,split]``; files relative to ``clips_dir`` (default: the CSV's folder).

    Classes come from ``classes_file`` (one per line, task order) or else are the sorted labels.
    Without a ``split`` column the seeded 80/10/10 split applies.
    """
    base = clips_dir or index_csv.parent
    with open(index_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{index_csv}: header must name columns file,label[,split], got {reader.fieldnames}")
        has_split = "split" in reader.fieldnames
        raw = [(r["file"].strip(), r["label"].strip(), (r.get("split") or "").strip()) for r in reader]
    if classes_file is not None:
        classes = tuple(line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip())
    else:
        classes = tuple(sorted({label for _, label, _ in raw}))
    rows = [(Path(file).stem, str(base / file), label, split if has_split else "train") for file, label, split in raw]
    found, rejected = labelled_candidates(rows, classes, index_csv)
    if not has_split:
        found = seeded_split(found, seed)
    return classes, found, rejected
