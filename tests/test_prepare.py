"""cign-prepare end to end on real mp4s: bad clips are listed, nothing else is lost, resume works."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from cign_runtime.spec import PRESETS
from cign_train.cli.prepare import main as prepare_cli
from cign_runtime.decode import decode_clip
from cign_train.data.ingest import Sources, prepare_dataset, store_dir
from cign_train.data.store import PreparedStore
from media import tone, write_clip

SPEC = PRESETS["cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good clips of two classes plus one clip of every bad kind, indexed by a file,label,split CSV."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i in range(6):
        label = "cat" if i % 2 else "dog"
        write_clip(root / f"good{i}.mp4", audio=tone(4.0, 22050, freq=300.0 + 100 * i))
        rows.append((f"good{i}.mp4", label, "train" if i < 4 else "test"))
    write_clip(root / "stereo48k.mp4", sample_rate=48000, channels=2, width=97, height=61, pix_fmt="yuv444p")
    write_clip(root / "a8k.mp4", sample_rate=8000)
    write_clip(root / "grey.mp4", pix_fmt="gray", width=80, height=80)
    write_clip(root / "short2s.mp4", seconds=2.0)
    rows += [("stereo48k.mp4", "cat", "train"), ("a8k.mp4", "dog", "train"),
             ("grey.mp4", "cat", "val"), ("short2s.mp4", "dog", "val")]
    bad = {
        "noaudio.mp4": ("no audio stream", lambda p: write_clip(p, with_audio=False)),
        "novideo.mp4": ("no video stream", lambda p: write_clip(p, with_video=False)),
        "tiny.mp4": ("too short", lambda p: write_clip(p, seconds=0.5)),
        "silent.mp4": ("silent", lambda p: write_clip(p, audio=np.zeros((1, 88200), np.float32))),
        "corrupt.mp4": ("unreadable", lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))),
        "missing.mp4": ("missing file", lambda p: None),
        "unknown.mp4": ("unknown label", lambda p: write_clip(p)),
    }
    for name, (_, make) in bad.items():
        make(root / name)
        rows.append((name, "bird" if name == "unknown.mp4" else "cat", "train"))
    whole = write_clip(root / "whole.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    rows.append(("truncated.mp4", "dog", "train"))
    (root / "classes.txt").write_text("dog\ncat\n")
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "split"])
        w.writerows(rows)
    expected = {name: reason for name, (reason, _) in bad.items()}
    return root, rows, expected


def _prepare(corpus, data_dir, **kw):
    root = corpus[0]
    sources = Sources(index=root / "index.csv", classes_file=root / "classes.txt", name="pets")
    return prepare_dataset("csv", data_dir, sources, preset="cpu", progress=False, **kw)


def test_every_bad_clip_is_listed_with_its_reason_and_no_good_clip_is_lost(corpus, tmp_path):
    root, rows, expected = corpus
    report = _prepare(corpus, tmp_path, workers=2)
    store = PreparedStore(store_dir(tmp_path, "pets", "cpu"))
    rejected = {r.id: r for r in report.rejected}
    for name, reason in expected.items():
        assert rejected[name[:-4]].reason == reason, name
        assert rejected[name[:-4]].path.endswith(name)
    assert "truncated" in rejected
    good = [r for r in rows if r[0][:-4] not in rejected]
    assert sorted(store.ids) == sorted(f[:-4] for f, _, _ in good) and len(good) == 10
    assert store.classes == ("dog", "cat")
    assert store.spec == SPEC
    listed = list(csv.DictReader(open(store.root / "rejected.csv")))
    assert {r["id"] for r in listed} == set(rejected)
    assert all(r["reason"] and r["detail"] for r in listed)
    summary = report.summary()
    assert f"{len(rejected)} rejected" in summary and "1 silent" in summary
    # the counts a user checks first: per split and per class, as stored
    splits = {sp: int((store.splits == sp).sum()) for sp in ("train", "val", "test")}
    assert f"stored, 10 samples (train {splits['train']}, val {splits['val']}, test {splits['test']})" in summary
    table = summary.splitlines()[1:]
    assert table[0].split() == ["class", "train", "val", "test"] and [r.split()[0] for r in table[1:]] == ["dog", "cat"]
    for row in table[1:]:
        name, *counts = row.split()
        k = store.classes.index(name)
        assert [int(c) for c in counts] == [int(((store.labels == k) & (store.splits == sp)).sum()) for sp in splits]

    by_id = {cid: i for i, cid in enumerate(store.ids)}
    for file, label, split in good:
        i = by_id[file[:-4]]
        assert store.classes[store.labels[i]] == label and store.splits[i] == split
    i = by_id["good3"]
    clip = decode_clip(root / "good3.mp4", SPEC)
    assert np.array_equal(store.frames(i), clip.frame)
    from cign_runtime.spec import log_spectrogram
    assert np.allclose(store.spectrograms(i), log_spectrogram(SPEC, clip.audio), atol=0.02)
    notes = json.loads((store.root / "index.json").read_text())["samples"]["notes"]
    assert any("padded" in n for n in notes[by_id["short2s"]])
    assert np.array_equal(store.indices("val"), sorted([by_id["grey"], by_id["short2s"]]))
    assert set(store.labels[store.indices(classes=[1])]) == {1}


def test_second_run_is_a_no_op_and_a_changed_plan_needs_overwrite(corpus, tmp_path):
    _prepare(corpus, tmp_path, workers=1)
    frames = store_dir(tmp_path, "pets", "cpu") / "frames.u8"
    before = frames.stat().st_mtime_ns
    again = _prepare(corpus, tmp_path, workers=1)
    assert again.skipped and again.stored == 10 and frames.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset("csv", tmp_path, Sources(index=corpus[0] / "index.csv", name="pets"), preset="cpu",
                        progress=False)


def test_resume_after_kill_gives_the_same_store(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    with open(clips / "index.csv", "w") as f:
        f.write("file,label,split\n")
        for i in range(40):
            write_clip(clips / f"c{i:02d}.mp4", seconds=3.5, audio=tone(3.5, 22050, freq=200.0 + 20 * i))
            f.write(f"c{i:02d}.mp4,{'ab'[i % 2]},train\n")
    cmd = [sys.executable, "-m", "cign_train.cli.prepare", "--dataset", "csv", "--index", str(clips / "index.csv"),
           "--preset", "cpu", "--workers", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--data-dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = store_dir(killed, "index", "cpu") / "progress.tsv"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.is_file() and progress.read_text().count("\n") >= 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = progress.read_text().count("\n")
    assert 8 <= done_before < 40, "the kill must land mid-run"
    assert not (progress.parent / "index.json").exists()

    result = CliRunner().invoke(prepare_cli, ["--dataset", "csv", "--index", str(clips / "index.csv"), "--preset",
                                              "cpu", "--workers", "1", "--data-dir", str(killed)])
    assert result.exit_code == 0, result.output
    assert "stored, 40 samples" in result.output
    lines = progress.read_text().splitlines()
    assert len(lines) == 40 and len({line.split("\t")[0] for line in lines}) == 40, "no row decoded twice"

    clean = tmp_path / "clean"
    CliRunner().invoke(prepare_cli, ["--dataset", "csv", "--index", str(clips / "index.csv"), "--preset", "cpu",
                                     "--data-dir", str(clean)])
    a, b = PreparedStore(store_dir(killed, "index", "cpu")), PreparedStore(store_dir(clean, "index", "cpu"))
    assert a.ids == b.ids
    idx = np.arange(len(a))
    assert np.array_equal(a.frames(idx), b.frames(idx))
    assert np.array_equal(a.spectrograms(idx), b.spectrograms(idx))


def test_cli_reports_missing_inputs_clearly(tmp_path):
    result = CliRunner().invoke(prepare_cli, ["--dataset", "vggsound100", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "--dataset vggsound100 needs --index" in result.output


def test_window_loudest_keeps_an_off_centre_clip_that_center_rejects(tmp_path):
    """cign-prepare --window loudest: a user clip whose sound lies outside the centred 3 s is kept (its
    loudest 3 s), where the default rejects it as silent naming the window; the choice is part of the plan."""
    rate = 22050
    audio = np.zeros((1, 6 * rate), np.float32)
    audio[0, int(0.2 * rate) : int(0.8 * rate)] = tone(0.6, rate, freq=1000.0)[0]
    write_clip(tmp_path / "early.mp4", seconds=6.0, audio=audio, sample_rate=rate)
    write_clip(tmp_path / "steady.mp4", audio=tone(4.0, rate, freq=500.0))
    index = tmp_path / "own.csv"
    index.write_text("file,label,split\nearly.mp4,bell,train\nsteady.mp4,hum,train\n")
    runner = CliRunner()
    base = ["--dataset", "csv", "--index", str(index), "--preset", "cpu", "--data-dir", str(tmp_path / "data"),
            "--workers", "1"]
    centred = runner.invoke(prepare_cli, base)
    assert centred.exit_code == 0, centred.output
    rejected = list(csv.DictReader(open(store_dir(tmp_path / "data", "own", "cpu") / "rejected.csv")))
    assert [(r["id"], r["reason"]) for r in rejected] == [("early", "silent")]
    assert "center audio window 1.5" in rejected[0]["detail"] and "--window loudest" in rejected[0]["detail"]
    again = runner.invoke(prepare_cli, base + ["--window", "loudest"])
    assert again.exit_code == 1 and "--overwrite" in again.output  # another window is another store
    loudest = runner.invoke(prepare_cli, base + ["--window", "loudest", "--overwrite"])
    assert loudest.exit_code == 0, loudest.output
    store = PreparedStore(store_dir(tmp_path / "data", "own", "cpu"))
    assert sorted(store.ids) == ["early", "steady"]
    early = store.ids.index("early")
    assert float(store.spectrograms([early]).max()) > 0  # the tone is in the stored window (silence: ln 1e-7)
