"""Decoding real mp4 files, including every bad-input case the prepare step must survive."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cign_runtime.spec import PRESETS, log_spectrogram
from cign_runtime.decode import ClipError, decode_clip
from media import gradient_frame, tone, write_clip

SPEC = PRESETS["cpu"]


def test_good_clip_frame_is_the_one_at_the_window_centre(tmp_path):
    path = write_clip(tmp_path / "good.mp4", seconds=4.0, fps=10, width=64, height=64)
    clip = decode_clip(path, SPEC)
    assert clip.frame.shape == (64, 64, 3) and clip.frame.dtype == np.uint8
    assert clip.audio.shape == (SPEC.n_samples,) and clip.audio.dtype == np.float32
    # The 3 s window is centred on the 4 s clip: the frame shown at 2.0 s is frame 20.
    expected = gradient_frame(64, 64, 20)
    assert abs(float(clip.frame[..., 2].mean()) - float(expected[..., 2].mean())) < 6
    assert abs(float(clip.frame[..., 2].mean()) - float(gradient_frame(64, 64, 19)[..., 2].mean())) > 20
    assert clip.notes == []


def test_audio_is_resampled_not_reinterpreted(tmp_path):
    """A 1 kHz tone at 48 kHz stereo keeps its pitch after resampling to 8 kHz mono."""
    audio = tone(4.0, 48000, freq=1000.0, channels=2)
    audio[1] = audio[0]
    path = write_clip(tmp_path / "stereo48k.mp4", audio=audio, sample_rate=48000, channels=2)
    clip = decode_clip(path, SPEC)
    spectrum = np.abs(np.fft.rfft(clip.audio))
    peak_hz = np.argmax(spectrum) * SPEC.sample_rate / SPEC.n_samples
    assert abs(peak_hz - 1000.0) < 5
    assert 0.2 < np.abs(clip.audio).max() < 0.45


def test_8khz_audio_is_upsampled(tmp_path):
    path = write_clip(tmp_path / "a8k.mp4", audio=tone(4.0, 8000, freq=500.0), sample_rate=8000)
    clip = decode_clip(path, SPEC)
    peak_hz = np.argmax(np.abs(np.fft.rfft(clip.audio))) * SPEC.sample_rate / SPEC.n_samples
    assert abs(peak_hz - 500.0) < 5


@pytest.mark.parametrize("pix_fmt,width,height", [("gray", 80, 80), ("yuv444p", 97, 61)])
def test_grey_and_odd_sized_frames_become_rgb_at_spec_size(tmp_path, pix_fmt, width, height):
    path = write_clip(tmp_path / f"{pix_fmt}.mp4", width=width, height=height, pix_fmt=pix_fmt)
    clip = decode_clip(path, SPEC)
    assert clip.frame.shape == SPEC.frame_shape
    if pix_fmt == "gray":
        assert np.array_equal(clip.frame[..., 0], clip.frame[..., 1])


def test_short_clip_is_padded_and_noted(tmp_path):
    path = write_clip(tmp_path / "short.mp4", seconds=2.0)
    clip = decode_clip(path, SPEC)
    assert clip.audio.shape == (SPEC.n_samples,)
    assert any("padded" in n for n in clip.notes)
    # 2 s of tone in the middle of a 3 s window: 0.5 s of zeros either side.
    edge = int(0.4 * SPEC.sample_rate)
    assert np.abs(clip.audio[:edge]).max() == 0 and np.abs(clip.audio[-edge:]).max() == 0


@pytest.mark.parametrize(
    "name,make,reason",
    [
        ("missing.mp4", lambda p: p, "missing file"),
        ("noaudio.mp4", lambda p: write_clip(p, with_audio=False), "no audio stream"),
        ("novideo.mp4", lambda p: write_clip(p, with_video=False), "no video stream"),
        ("tiny.mp4", lambda p: write_clip(p, seconds=0.5), "too short"),
        ("silent.mp4", lambda p: write_clip(p, audio=np.zeros((1, 88200), np.float32)), "silent"),
        ("garbage.mp4", lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8), "unreadable"),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(ClipError) as info:
        decode_clip(path, SPEC)
    assert info.value.reason == reason
    assert str(path) in str(info.value)


def test_truncated_mp4_is_rejected(tmp_path):
    path = write_clip(tmp_path / "whole.mp4")
    data = path.read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipError) as info:
        decode_clip(cut, SPEC)
    assert info.value.reason in {"unreadable", "corrupt", "too short"}
    assert "truncated.mp4" in str(info.value)


def test_decoded_window_matches_spectrogram_spec(tmp_path):
    clip = decode_clip(write_clip(tmp_path / "c.mp4"), SPEC)
    assert log_spectrogram(SPEC, clip.audio).shape == SPEC.spectrogram_shape


def off_centre_clip(path, rate=22050):
    """A 6 s clip silent except for a 1 kHz tone at 0.2-0.8 s: outside the centred 1.5-4.5 s window."""
    audio = np.zeros((1, 6 * rate), np.float32)
    audio[0, int(0.2 * rate) : int(0.8 * rate)] = tone(0.6, rate, freq=1000.0)[0]
    return write_clip(path, seconds=6.0, audio=audio, sample_rate=rate, fps=10, width=64, height=64)


def test_silent_rejection_names_the_window_and_where_the_sound_is(tmp_path):
    path = off_centre_clip(tmp_path / "early.mp4")
    with pytest.raises(ClipError) as info:
        decode_clip(path, SPEC)
    detail = info.value.detail
    assert info.value.reason == "silent" and "center audio window 1.5" in detail and "-4.5" in detail
    assert re.search(r"the clip has sound at 0\.[12]\d-0\.8\d s \(--window loudest", detail), detail
    silent = write_clip(tmp_path / "silent.mp4", audio=np.zeros((1, 88200), np.float32))
    with pytest.raises(ClipError, match="the whole clip is silent"):
        decode_clip(silent, SPEC)


def test_loudest_window_takes_the_off_centre_sound_and_its_frame(tmp_path):
    path = off_centre_clip(tmp_path / "early.mp4")
    clip = decode_clip(path, SPEC, window="loudest")
    loud = np.flatnonzero(np.abs(clip.audio) > 0.1)
    assert loud.size and loud[0] / SPEC.sample_rate < 0.3  # the window starts at the clip start (the tone at 0.2 s)
    # Its centre is 1.5 s: the frame shown then is frame 15 (gradient_frame's blue channel is 40 * t).
    assert abs(float(clip.frame[..., 2].mean()) - float(gradient_frame(64, 64, 15)[..., 2].mean())) < 6
