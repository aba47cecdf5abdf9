"""cign-enroll on real exports of a trained tiny run: versions, fitting, forgetting, and refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cign_export.exporter import Exporter, ExportOptions
from cign_runtime import enroll as en
from cign_runtime import manifest as mf
from cign_runtime.spec import log_spectrogram
from cign_train.data.ingest import store_dir
from cign_train.data.store import PreparedStore
from media import gradient_frame, tone, write_clip

pytestmark = pytest.mark.usefixtures("one_thread")
DIGITS = ("zero", "one", "two", "three", "four")
BOUND = 0.1  # |p_av| change of an old class on its clips when a class is enrolled


@pytest.fixture(scope="module")
def store(tiny_avdigits):
    return PreparedStore(store_dir(tiny_avdigits, "avdigits", "cpu"))


def clips(store, tiny_avdigits, cls: str, split: str) -> list[str]:
    """Clip files of one class's ``split`` samples of the tiny store."""
    idx = store.indices(split, [store.classes.index(cls)])
    return [str(tiny_avdigits / "avdigits" / "clips" / f"{store.ids[i]}.mp4") for i in idx]


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    """Task 0 of the tiny run (digits zero..four) exported with the token table as an input, fp32 + int8-cpu."""
    out = tmp_path_factory.mktemp("enroll") / "tiny-task0"
    Exporter(tiny_run, 0, out, ExportOptions(precisions=("fp32", "int8-cpu"), tokens_as_input=True,
                                             calibration_per_class=2, parity_samples=10))()
    return out


def tone_clip(path: Path, i: int) -> Path:
    """Clip i of a class the tiny model never saw: a tone near 660 Hz over a moving colour pattern (each clip its
    own pitch, loudness and frames)."""
    audio = tone(4.0, 22050, freq=640.0 + 10 * i, amplitude=0.2 + 0.02 * i)
    return write_clip(path, 4.0, audio=audio, frame_fn=lambda w, h, t: gradient_frame(w, h, 7 * i + t))


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tones")
    return [str(tone_clip(folder / f"tone{i}.mp4", i)) for i in range(8)]


@pytest.fixture(scope="module")
def enrolled(export, tones):
    """The tone class enrolled from five clips: (the new version, its record); clips 5-7 are held out. The shots
    weigh half the loss: the default's tenth is tuned to a trained model's exemplars, and the tiny run's export
    keeps one val clip per class."""
    shots = en.load_shots(tones[:5], mf.Manifest.load(export).spec)
    assert not shots.refused
    return en.enroll(export, "tone", shots.accepted, en.FitOptions(positive_weight=0.5))


def p_av(root: Path, files: list[str], precision: str = "fp32") -> tuple[np.ndarray, list[str]]:
    """p_av of clip files through a version's graph with its newest table, and the class names of its columns."""
    m = mf.Manifest.load(root)
    shots = [en.shot_from_file(f, m.spec) for f in files]
    feeds = mf.feed(np.stack([s.frame for s in shots]), np.stack([log_spectrogram(m.spec, s.audio) for s in shots]))
    session = ort.InferenceSession(str(root / m.artefact("onnx", precision).path), providers=["CPUExecutionProvider"])
    table = np.load(root / m.artefact("tokens", task=m.task).path)
    return session.run(["p_av"], {**feeds, mf.TOKENS: table})[0], m.classes


def test_export_carries_what_enrolment_needs(export):
    m = mf.Manifest.load(export)
    assert {"encoders", "head", "exemplars"} <= {a.role for a in m.artefacts}
    ex = en.Exemplars.load(export / "exemplars.npz")
    assert ex.f_v.dtype == np.float16 and sorted(set(ex.labels.tolist())) == list(range(len(m.classes)))


def test_a_version_is_written_beside_and_the_parent_is_unchanged(export, enrolled, tones):
    version, record = enrolled
    assert version == export.parent / f"{export.name}.r1" and version.is_dir()
    parent = mf.Manifest.load(export)
    m = mf.Manifest.load(version)  # every artefact's sha256 verified
    assert m.classes == parent.classes + ["tone"] and m.classes_per_task == parent.classes_per_task + [1]
    assert m.revision == 1 and m.parent["manifest_sha256"] == mf.sha256(export / mf.FILENAME)
    assert len(parent.classes) == 5 and np.load(export / "tokens_task0.npy").shape[0] == 5  # untouched
    new_table = np.load(version / m.artefact("tokens", task=m.task).path)
    np.testing.assert_array_equal(new_table[:5], np.load(export / "tokens_task0.npy"))  # old tokens unchanged
    assert [s["sha256"] for s in m.enrolled[0]["sources"]] == [mf.sha256(f) for f in tones[:5]]
    assert m.enrolled[0]["shots"] == 5 and set(record["checks"]) == {"fp32", "int8-cpu"}
    assert len(en.Exemplars.load(version / "exemplars.npz").labels) == len(en.Exemplars.load(export / "exemplars.npz").labels) + 5
    assert not list(export.parent.glob(".*partial*"))


def test_the_enrolled_class_is_recognised_on_held_out_clips(enrolled, tones):
    version, _ = enrolled
    for precision in ("fp32", "int8-cpu"):
        p, names = p_av(version, tones[5:], precision)
        assert np.mean(np.asarray(names)[p.argmax(1)] == "tone") == 1.0, precision  # chance: 1 in 6


def test_old_classes_move_only_within_a_bound(export, enrolled, store, tiny_avdigits):
    version, _ = enrolled
    old = [f for c in DIGITS for f in clips(store, tiny_avdigits, c, "test")]
    before, _ = p_av(export, old)
    after, _ = p_av(version, old)
    assert np.abs(after[:, :5] - before).max() < BOUND  # through the attention of eqs 1-2 only


def test_a_removed_class_is_never_predicted_again(export, enrolled, store, tiny_avdigits, tones):
    version, _ = enrolled
    forgotten = en.remove(version, "tone")
    m = mf.Manifest.load(forgotten)
    assert "tone" not in m.classes and not m.enrolled and m.revision == 2
    files = tones + clips(store, tiny_avdigits, "zero", "test")
    p, names = p_av(forgotten, files)
    assert "tone" not in {names[i] for i in p.argmax(1)}
    np.testing.assert_array_equal(p, p_av(export, files)[0])  # exactly the model before the enrolment


def test_the_cli_lists_renames_and_enrols_without_torch(export, store, tiny_avdigits, torchless_env, tmp_path):
    csv = tmp_path / "six.csv"
    csv.write_text("path\n" + "\n".join(clips(store, tiny_avdigits, "six", "train")[:3]) + "\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "cign_runtime.enroll_cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, env=torchless_env, timeout=300)
    done = run(export, "--name", "six", "--csv", csv, "--steps", "10")
    assert done.returncode == 0, done.stderr
    version = Path(done.stdout.strip().splitlines()[-1])
    assert mf.Manifest.load(version).classes[-1] == "six"
    renamed = run(version, "--rename", "six", "--name", "digit six")
    assert renamed.returncode == 0, renamed.stderr
    listing = run(Path(renamed.stdout.split(": ")[-1].strip()), "--list")
    assert "digit six  enrolled" in listing.stdout and "zero  trained" in listing.stdout


def test_bad_shots_are_refused_by_name_and_the_rest_kept(export, store, tiny_avdigits, tmp_path):
    spec = mf.Manifest.load(export).spec
    silent = write_clip(tmp_path / "silent.mp4", 2.0, audio=tone(2.0, 22050, amplitude=1e-4))
    black = write_clip(tmp_path / "black.mp4", 2.0, frame_fn=lambda w, h, t: np.zeros((h, w, 3), np.uint8))
    good = clips(store, tiny_avdigits, "seven", "train")[:2]
    report = en.load_shots([silent, black, *good], spec)
    assert [s.source for s in report.accepted] == good
    assert len(report.refused) == 2
    assert str(silent) in report.refused[0] and "silent shot" in report.refused[0]
    assert str(black) in report.refused[1] and "black frame" in report.refused[1]


def test_refusals_name_the_problem(export, tiny_run, tmp_path, store, tiny_avdigits):
    shots = en.load_shots(clips(store, tiny_avdigits, "eight", "train")[:2], mf.Manifest.load(export).spec).accepted
    with pytest.raises(en.EnrollError, match="'one' exists already"):
        en.enroll(export, "one", shots)
    baked = tmp_path / "baked"
    Exporter(tiny_run, 0, baked, ExportOptions(parity_samples=4))()
    with pytest.raises(en.EnrollError, match=f"cign-export --run {tiny_run} --task 0 --tokens-as-input"):
        en.enroll(baked, "eight", shots)
    version, _ = en.enroll(export, "eight", shots, en.FitOptions(steps=2))
    table = version / f"tokens_task{mf.Manifest.load(version).task}.npy"
    np.save(table, np.load(table) * 1.01)  # tampered after it was written
    with pytest.raises(en.EnrollError, match=f"{table}: sha256 differs"):
        en.remove(version, "eight")
    assert json.loads((export / mf.FILENAME).read_text())["classes"] == ["zero", "one", "two", "three", "four"]
