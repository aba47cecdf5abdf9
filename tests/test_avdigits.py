"""The avdigits generator: eSpeak synthesis, held-out splits, real mp4 output, determinism, caching."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from cign_train.data.avdigits import CLASSES, AvdigitsConfig, generate
from cign_train.data.avdigits.speech import Voice, synthesise
from cign_train.data.avdigits.splits import pools

SMALL = AvdigitsConfig(train_per_class=2, val_per_class=2, test_per_class=2)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("avd") / "root", SMALL, seed=3, workers=2, progress=False)


def _rows(csv_path: Path) -> list[list[str]]:
    with csv_path.open(newline="") as f:
        return list(csv.reader(f))


def test_synthesis_is_a_plausible_word_and_depends_on_the_voice():
    male, rate = synthesise("seven", Voice("en-us", "m3"))
    female, _ = synthesise("seven", Voice("en-gb-x-rp", "f2", speed=140, pitch=70))
    assert rate == 22050
    for word in (male, female):
        assert word.dtype == np.float32
        assert 0.2 < len(word) / rate < 1.5
        assert np.sqrt(np.mean(word**2)) > 0.01
    assert len(male) != len(female) or not np.allclose(male, female)
    again, _ = synthesise("seven", Voice("en-us", "m3"))
    np.testing.assert_array_equal(male, again)  # no state carried between utterances


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="variant"):
        synthesise("one", Voice("en", "no-such-variant"))


def test_index_csv_lists_every_clip(small_set: Path):
    rows = _rows(small_set)
    assert len(rows) == 3 * 2 * len(CLASSES)
    assert len({r[0] for r in rows}) == len(rows)
    for clip_id, start, label, split in rows:
        assert clip_id.startswith("avd") and start == "0"
        assert (small_set.parent / "clips" / f"{clip_id}_{int(start):06d}.mp4").is_file()
    for split in ("train", "val", "test"):
        labels = sorted(r[2] for r in rows if r[3] == split)
        assert labels == sorted(CLASSES * 2)
    record = json.loads((small_set.parent / "avdigits.json").read_text())
    assert record["seed"] == 3 and record["config"]["train_per_class"] == 2


def test_clips_are_h264_and_aac_mp4(small_set: Path):
    clip_id = _rows(small_set)[0][0]
    with av.open(str(small_set.parent / "clips" / f"{clip_id}_000000.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert (video.width, video.height) == (SMALL.frame_size, SMALL.frame_size)
        assert audio.sample_rate == 22050 and audio.channels == 1
        assert abs(float(container.duration / av.time_base) - SMALL.clip_seconds) < 0.1
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        container.seek(0)
        samples = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert len(frames) == SMALL.clip_seconds * SMALL.fps
    assert frames[0].shape == (SMALL.frame_size, SMALL.frame_size, 3) and frames[0].std() > 5
    assert abs(len(samples) - SMALL.clip_seconds * 22050) <= 1024
    assert np.abs(samples).max() > 0.1


def test_held_out_images_and_voices_are_disjoint():
    split = pools(SMALL, 3)
    for label in range(len(CLASSES)):
        train, val, test = (set(split.images[s][label]) for s in ("train", "val", "test"))
        assert train and val and test
        assert not (train & val or train & test or val & test)
    assert not set(split.variants["train"]) & set(split.variants["test"])
    assert split.variants["val"] == split.variants["test"]


def test_same_seed_gives_identical_files_for_any_worker_count(small_set: Path, tmp_path: Path):
    other = generate(tmp_path / "root", SMALL, seed=3, workers=1, progress=False)
    assert other.read_bytes() == small_set.read_bytes()
    for clip_id, *_ in _rows(small_set):
        name = f"{clip_id}_000000.mp4"
        assert (other.parent / "clips" / name).read_bytes() == (small_set.parent / "clips" / name).read_bytes()


def test_second_call_is_cached_and_new_settings_regenerate(small_set: Path):
    clips = sorted((small_set.parent / "clips").glob("*.mp4"))
    before = [p.stat().st_mtime_ns for p in clips]
    assert generate(small_set.parent, SMALL, seed=3, progress=False) == small_set
    assert [p.stat().st_mtime_ns for p in clips] == before
    fewer = AvdigitsConfig(train_per_class=1, val_per_class=1, test_per_class=1)
    generate(small_set.parent, fewer, seed=3, workers=2, progress=False)
    assert len(_rows(small_set)) == 3 * len(CLASSES)
    assert len(list((small_set.parent / "clips").glob("*"))) == 3 * len(CLASSES)
