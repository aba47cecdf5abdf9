"""cign-live end to end on real avdigits test clips with a model exported from a run the tests trained,
in a process where torch cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from cign_export.exporter import Exporter, ExportOptions
from cign_runtime import latency
from cign_runtime.live import preprocess
from cign_runtime.manifest import Manifest
from cign_runtime.spec import get_preset
from cign_train.data.decode import decode_clip
from cign_train.preprocess import log_spectrogram, normalize_frames, normalize_spectrogram


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "export"
    Exporter(tiny_run, 1, out, ExportOptions(precisions=("fp32", "int8-cpu"), parity_samples=6))()
    return out


@pytest.fixture(scope="module")
def clips(tiny_avdigits):
    rows = [r.split(",") for r in (tiny_avdigits / "avdigits" / "avdigits.csv").read_text().splitlines()]
    return [tiny_avdigits / "avdigits" / "clips" / f"{r[0]}_{int(r[1]):06d}.mp4" for r in rows if r[3] == "test"][:3]


def run_live(*args, env):
    """cign-live in a subprocess (``torchless_env``: its torch import fails)."""
    return subprocess.run([sys.executable, "-m", "cign_runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_headless_file_run_without_torch_predicts_every_hop_and_logs_every_stage(export, clips, tmp_path, torchless_env):
    clip = clips[0]
    log_path, rec = tmp_path / "lat.jsonl", tmp_path / "annotated.mp4"
    proc = run_live("--model", export, "--camera", clip, "--mic", clip, "--headless", "--no-realtime", "--hop", "0.5",
                    "--latency-log", log_path, "--record", rec, env=torchless_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 8  # a 4 s clip, one prediction every 0.5 s of media time
    assert [x["media_time"] for x in lines] == [0.5 * (i + 1) for i in range(8)]
    classes = Manifest.load(export).classes
    for x in lines:
        assert x["modality"] == "audio_visual" and len(x["top"]) == 3
        assert x["top"][0]["class"] in classes
        for item in x["top"]:
            assert item["p_av"] == pytest.approx(item["p_audio"] * item["p_visual"], rel=1e-3, abs=1e-6)
        assert x["label"] in classes + ["no known source"]
    assert "int8-cpu" in proc.stderr and "ort-cpu" in proc.stderr  # the backend and precision auto chose
    records = latency.read_log(log_path)
    assert len([r for r in records if "index" in r]) == 8
    assert all(set(latency.STAGES) <= set(r) and all(r[s] >= 0 for s in latency.STAGES) for r in records if "index" in r)
    assert "end_to_end" in proc.stderr and "predictions: 8" in proc.stderr  # the summary table at exit
    with av.open(str(rec)) as f:
        stream = f.streams.video[0]
        assert stream.codec_context.name == "h264" and sum(1 for _ in f.decode(stream)) == 8

    summary = run_live("--summarize", log_path, env=torchless_env)
    assert summary.returncode == 0 and "preprocess" in summary.stdout
    png = log_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_preprocessing_matches_the_training_side_torch_implementation(clips):
    spec = get_preset("cpu")
    decoded = decode_clip(clips[1], spec)
    feed = preprocess(spec, decoded.frame, decoded.audio)
    frames = normalize_frames(spec, torch.from_numpy(decoded.frame)[None])
    spectrogram = normalize_spectrogram(spec, log_spectrogram(spec, torch.from_numpy(decoded.audio))[None])
    # the graph normalises; undo nothing: compare the graph's inputs after its normalisation
    got_frames = (feed["frame"] / 255.0 - np.asarray(spec.frame_mean, np.float32)[:, None, None]) / \
        np.asarray(spec.frame_std, np.float32)[:, None, None]
    np.testing.assert_allclose(got_frames, frames.numpy(), atol=1e-5)
    got_spec = (feed["spectrogram"][:, 0] - spec.spec_mean) / spec.spec_std
    np.testing.assert_allclose(got_spec, spectrogram.numpy(), atol=2e-3)


def test_bad_inputs_are_clear_errors(export, clips, torchless_env):
    proc = run_live("--model", export, "--camera", "/dev/video97", "--mic", clips[0], "--headless", env=torchless_env)
    assert proc.returncode == 1 and "camera '/dev/video97' cannot be opened" in proc.stderr
    proc = run_live("--model", export, "--backend", "ort-cuda", "--camera", clips[0], "--mic", clips[0], env=torchless_env)
    assert proc.returncode == 1 and "available: ['ort-cpu']" in proc.stderr
    proc = run_live("--model", export, "--camera", "0", "--mic", "default", "--no-realtime", env=torchless_env)
    assert proc.returncode == 2 and "--no-realtime steps through files" in proc.stderr


def test_runtime_installs_into_a_fresh_venv_without_torch_and_runs(export, clips, tmp_path):
    """The base install is the runtime: a virtual environment with only it runs cign-live."""
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", root],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "None"
    proc = subprocess.run([str(env_dir / "bin" / "cign-live"), "--model", str(export), "--camera", str(clips[0]),
                           "--mic", str(clips[0]), "--headless", "--no-realtime", "--max-predictions", "3"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 3 and "end_to_end" in proc.stderr
