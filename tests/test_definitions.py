"""The four data set definitions and their ingestion paths, checked against the reference lists in ../shared."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from cign_train.data import definitions as defs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference lists not found at {SHARED}")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@needs_shared
def test_vgginstruments_matches_the_reference_class_order():
    d = defs.get_definition("vgginstruments")
    rows = list(csv.DictReader(open(SHARED / "vgginstruments" / "classes.csv")))
    assert d.classes == tuple(r["vggsound_label"] for r in rows) and len(d.classes) == 36
    assert d.short_names[:2] == ("flute", "cello")
    assert d.classes[10] == "playing violin, fiddle"
    tasks = d.task_classes()
    assert len(tasks) == 4 and all(len(t) == 9 for t in tasks)
    assert [d.short_names[i] for i in tasks[0]] == [r["name"] for r in rows if r["task"] == "0"]


@needs_shared
def test_vggsound100_and_vggss_lists():
    v100 = defs.get_definition("vggsound100")
    assert v100.classes == tuple(_lines(SHARED / "vggsound100_classes.txt")) and len(set(v100.classes)) == 100
    assert [len(t) for t in v100.task_classes()] == [25] * 4
    assert [len(t) for t in v100.task_classes(10)] == [10] * 10
    vggss = defs.get_definition("vggss")
    assert vggss.classes == tuple(_lines(SHARED / "vggss_classes.txt")) and len(set(vggss.classes)) == 220
    assert [len(t) for t in vggss.task_classes()] == [55] * 4
    with pytest.raises(ValueError, match="do not split into 3 equal tasks"):
        vggss.task_classes(3)


def test_avdigits_definition_and_unknown_name():
    d = defs.get_definition("avdigits")
    assert d.classes[0] == "zero" and len(d.classes) == 10 and d.task_classes() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        defs.get_definition("imagenet")


def test_vggsound_csv_with_quoted_labels_and_seeded_80_10_10_split(tmp_path):
    d = defs.get_definition("vgginstruments")
    index = tmp_path / "vggsound.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        for i in range(50):
            w.writerow([f"vid{i:03d}", 30, "playing violin, fiddle", "train"])
            w.writerow([f"cel{i:03d}", 10 * i, "playing cello", "test"])
        w.writerow(["dog00000001", 0, "dog barking", "train"])  # another VGGSound class: out of scope
    found, skipped = defs.vggsound_candidates(d, index, tmp_path / "clips", seed=3)
    assert skipped == 1 and len(found) == 100
    assert found[0].path == str(tmp_path / "clips" / "cel000_000000.mp4")
    for label in ("playing violin, fiddle", "playing cello"):
        assert Counter(c.split for c in found if c.label == label) == {"train": 40, "val": 5, "test": 5}
    again, _ = defs.vggsound_candidates(d, index, tmp_path / "clips", seed=3)
    other, _ = defs.vggsound_candidates(d, index, tmp_path / "clips", seed=4)
    assert again == found and other != found


def test_bad_vggsound_rows_name_the_line(tmp_path):
    index = tmp_path / "vggsound.csv"
    index.write_text("abc,30,playing cello,train\nabd,thirty,playing cello,train\n")
    with pytest.raises(ValueError, match=r"vggsound.csv:2: start_seconds 'thirty'"):
        defs.read_vggsound_csv(index)


@needs_shared
def test_official_vgginstruments_split_files(tmp_path):
    d = defs.get_definition("vgginstruments")
    found, rejected = defs.split_file_candidates(d, SHARED / "vgginstruments", tmp_path)
    placeholders = sum(line.startswith("-,") for p in (SHARED / "vgginstruments").glob("group_*.txt")
                       for line in p.read_text().splitlines())
    total = sum(len(_lines(p)) for p in (SHARED / "vgginstruments").glob("group_*.txt"))
    assert placeholders > 0 and rejected == [] and len(found) == total - placeholders
    counts = Counter(c.split for c in found)
    assert counts["train"] > 8 * counts["test"] > 0
    first = found[0]
    assert first.label in d.classes and first.path.endswith(".mp4") and "_0000" in first.id
    task_of = {label: t for t, block in enumerate(d.task_classes()) for label in (d.classes[i] for i in block)}
    group3 = [c for c in found if c.label in {d.classes[i] for i in d.task_classes()[3]}]
    assert group3 and all(task_of[c.label] == 3 for c in group3)


def test_split_file_with_an_unknown_class_is_rejected_not_dropped(tmp_path):
    d = defs.get_definition("vgginstruments")
    for t in range(4):
        for split in defs.SPLITS:
            (tmp_path / f"group_{t}_{split}.txt").write_text("abc_000030,flute\n-,flute\nxyz_000010,kazoo\n")
    found, rejected = defs.split_file_candidates(d, tmp_path, tmp_path / "clips")
    assert len(found) == 12 and len(rejected) == 12
    assert rejected[0].reason == "unknown label" and "'kazoo' is not a class" in rejected[0].detail


def test_user_csv_without_split_column_gets_a_seeded_split(tmp_path):
    index = tmp_path / "mine.csv"
    index.write_text("file,label\n" + "".join(f"sub/a{i}.mp4,{'xy'[i % 2]}\n" for i in range(20)))
    classes, found, rejected = defs.csv_candidates(index, None, seed=0)
    assert classes == ("x", "y") and rejected == []
    assert found[0].path == str(tmp_path / "sub" / found[0].id) + ".mp4"
    assert Counter(c.split for c in found) == {"train": 16, "val": 2, "test": 2}
    (tmp_path / "bad.csv").write_text("path,class\na.mp4,x\n")
    with pytest.raises(ValueError, match="header must name columns file,label"):
        defs.csv_candidates(tmp_path / "bad.csv", None, seed=0)
