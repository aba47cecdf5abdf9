"""The numpy (runtime) and torch (training) implementations of the one preprocessing spec agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cign_runtime import spec as np_spec
from cign_runtime.spec import PRESETS, PreprocessSpec, get_preset
from cign_train import preprocess as torch_spec


def test_paper_preset_has_the_paper_shapes():
    paper = get_preset("paper")
    assert paper.spectrogram_shape == (257, 300)
    assert paper.frame_shape == (224, 224, 3)
    assert paper.n_samples == 3 * 22050


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_log_spectrogram_parity(name):
    spec = PRESETS[name]
    rng = np.random.default_rng(0)
    t = np.arange(spec.n_samples) / spec.sample_rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.05 * rng.standard_normal(spec.n_samples)]).astype(np.float32)
    ref = np_spec.log_spectrogram(spec, audio)
    out = torch_spec.log_spectrogram(spec, torch.from_numpy(audio)).numpy()
    assert ref.shape == out.shape == (2, *spec.spectrogram_shape)
    # float32 FFTs differ in rounding; ln turns that into an absolute error, largest where power
    # is tiny (a sine's leakage floor). 1e-2 in ln power is 1e-3 of the normalised input's std.
    err = np.abs(ref - out)
    assert err.max() < 1e-2 and err.mean() < 1e-4
    np.testing.assert_allclose(np_spec.normalize_spectrogram(spec, ref),
                               torch_spec.normalize_spectrogram(spec, torch.from_numpy(ref)).numpy(), atol=1e-6)
    # The 440 Hz tone lands in its bin.
    assert np.argmax(ref[0].mean(axis=1)) == round(440 * spec.n_fft / spec.sample_rate)


def test_frame_normalisation_parity():
    spec = PRESETS["paper"]
    frames = np.random.default_rng(1).integers(0, 256, size=(2, *spec.frame_shape), dtype=np.uint8)
    ref = np_spec.normalize_frames(spec, frames)
    out = torch_spec.normalize_frames(spec, torch.from_numpy(frames)).numpy()
    assert ref.shape == out.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(ref, out, atol=1e-5)
    assert abs(ref[0, 0, 0, 0] - (frames[0, 0, 0, 0] / 255 - 0.485) / 0.229) < 1e-5


def test_spec_json_round_trip_and_validation():
    spec = PRESETS["cpu"]
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown preprocessing spec fields"):
        PreprocessSpec.from_dict({**spec.to_dict(), "n_mels": 64})
    with pytest.raises(ValueError, match="win_length 600 exceeds n_fft 512"):
        PreprocessSpec(win_length=600)
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        get_preset("tiny")


def test_fit_window_centres_and_pads():
    a = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(np_spec.fit_window(a, 4), [3, 4, 5, 6])
    np.testing.assert_array_equal(np_spec.fit_window(a[:2], 5), [0, 0, 1, 0, 0])


def test_resize_frame_handles_grey_and_rejects_float():
    spec = PRESETS["cpu"]
    grey = np.full((30, 50), 77, np.uint8)
    out = np_spec.resize_frame(spec, grey)
    assert out.shape == (64, 64, 3) and (out == 77).all()
    with pytest.raises(ValueError, match="uint8 frame"):
        np_spec.resize_frame(spec, np.zeros((8, 8, 3), np.float32))


def test_runtime_spec_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, cign_runtime.spec, cign_runtime.records; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
