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
    # The 440 Hz tone lands in its bin, or in the mel band whose triangle peaks nearest 440 Hz.
    tone_bin = round(440 * spec.n_fft / spec.sample_rate)
    expected = np.argmax(np_spec.mel_filterbank(spec)[:, tone_bin]) if spec.n_mels else tone_bin
    assert np.argmax(ref[0].mean(axis=1)) == expected


def test_mel_filterbank_hand_computed():
    """HTK mel: m(f) = 2595 log10(1 + f / 700). 8 kHz, n_fft 8 -> bins at 0, 1000, 2000, 3000, 4000 Hz;
    2 bands -> edges at mel 0, m(4000) / 3, 2 m(4000) / 3, m(4000) (2146.1) = 0, 620.6, 1791.3, 4000 Hz."""
    spec = PreprocessSpec(sample_rate=8000, n_fft=8, win_length=8, hop_length=4, n_mels=2)
    fb = np_spec.mel_filterbank(spec)
    edges = [0.0, 620.6, 1791.3, 4000.0]
    expected = [[0.0, (edges[2] - 1000) / (edges[2] - edges[1]), 0.0, 0.0, 0.0],
                [0.0, (1000 - edges[1]) / (edges[2] - edges[1]), (edges[3] - 2000) / (edges[3] - edges[2]),
                 (edges[3] - 3000) / (edges[3] - edges[2]), 0.0]]
    np.testing.assert_allclose(fb, expected, atol=2e-4)
    assert spec.spectrogram_shape == (2, 1 + 24000 // 4)


def test_mel_spectrogram_is_the_log_of_pooled_power():
    spec = PRESETS["cpu"]
    assert spec.n_mels and spec.spectrogram_shape == (spec.n_mels, spec.n_time)
    audio = 0.1 * np.random.default_rng(2).standard_normal(spec.n_samples).astype(np.float32)
    linear = np_spec.log_spectrogram(PreprocessSpec(**{**spec.to_dict(), "n_mels": 0}), audio)
    pooled = np.log(np_spec.mel_filterbank(spec) @ np.exp(linear.astype(np.float64)))
    np.testing.assert_allclose(np_spec.log_spectrogram(spec, audio), pooled, atol=1e-4)


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
        PreprocessSpec.from_dict({**spec.to_dict(), "f_max": 4000})
    with pytest.raises(ValueError, match="win_length 600 exceeds n_fft 512"):
        PreprocessSpec(win_length=600)
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        get_preset("tiny")
    with pytest.raises(ValueError, match="n_mels 100 leaves mel bands without an STFT bin"):
        PreprocessSpec(sample_rate=8000, n_fft=256, win_length=256, n_mels=100)


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
