"""The one preprocessing specification shared by prepare, training, export and the live runtime.

Every number that turns a clip into model inputs lives in :class:`PreprocessSpec`; prepared
stores, checkpoints and export manifests carry it as JSON. This module holds the numpy
implementation (the runtime imports no torch); ``cign_train.preprocess`` holds the torch one and
``tests/test_spec_parity.py`` checks that both agree.

Paper (Sec. 4.1): 224x224 frames; log spectrogram of 3 s of 22,050 Hz audio, 257 x 300. The
paper's "50 ms window, 25 ms hop" cannot give that shape: 257 bins need n_fft = 512 (23.2 ms at
22,050 Hz) and a 25 ms hop gives 121 frames. We keep the paper's tensor shape and choose
n_fft = win_length = 512 (periodic Hann) with hop 221 samples (10.0 ms) and centred frames
(reflect padding): 1 + 66150 // 221 = 300 frames. The spectrogram is ln(|STFT|^2 + 1e-7)
(the log power of the reference release's audio pipeline), normalised as (x - mean) / std.

With ``n_mels > 0`` the power spectrum is first pooled by an HTK mel filterbank (triangles on the
mel scale 2595 log10(1 + f / 700) from 0 Hz to Nyquist, peak 1, unnormalised: torchaudio's
``melscale_fbanks`` defaults), and the log is taken of the band energies. The ``cpu`` preset does
this; the ``paper`` preset keeps the paper's linear-frequency spectrogram.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cign_runtime.records import known_fields

#: ImageNet statistics: the paper initialises the visual ResNet18 from ImageNet-style pretraining.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=8)
def mel_filterbank(spec: PreprocessSpec) -> np.ndarray:
    """HTK mel triangles (n_mels, n_bins) float32, each peaking at 1 on its centre frequency.

    Cached per spec (read-only): the live loop computes a spectrogram per prediction."""
    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)

    edges = 700.0 * (10.0 ** (np.linspace(0.0, mel(spec.sample_rate / 2), spec.n_mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, spec.sample_rate / 2, spec.n_bins)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - low) / (centre - low), (high - bins) / (high - centre)
    bank = np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)
    bank.flags.writeable = False
    return bank


@dataclass(frozen=True)
class PreprocessSpec:
    """Audio and frame preprocessing, from decoded media to normalised model inputs."""

    name: str = "paper"
    sample_rate: int = 22050  # Hz, mono
    clip_seconds: float = 3.0  # analysis window, centred on the clip
    n_fft: int = 512  # -> n_fft // 2 + 1 frequency bins
    win_length: int = 512  # periodic Hann window
    hop_length: int = 221  # samples between STFT frames
    n_mels: int = 0  # mel bands pooling the STFT bins; 0 keeps the n_fft // 2 + 1 linear bins (paper)
    log_eps: float = 1e-7  # ln(|X|^2 + eps)
    spec_mean: float = 0.0  # log-spectrogram normalisation
    spec_std: float = 12.0
    frame_size: int = 224  # frames are resized (not cropped) to frame_size x frame_size RGB
    frame_mean: tuple[float, float, float] = IMAGENET_MEAN
    frame_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} exceeds n_fft {self.n_fft}")
        if min(self.sample_rate, self.n_fft, self.hop_length, self.frame_size) <= 0 or self.n_mels < 0:
            raise ValueError(f"spec {self.name!r} has a non-positive size: {self}")
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "frame_mean", tuple(float(v) for v in self.frame_mean))
        object.__setattr__(self, "frame_std", tuple(float(v) for v in self.frame_std))
        if self.n_mels and not (mel_filterbank(self).max(axis=1) > 0).all():
            # the lowest bands are narrower than the STFT's bin spacing
            raise ValueError(f"n_mels {self.n_mels} leaves mel bands without an STFT bin at n_fft {self.n_fft}")

    @property
    def n_samples(self) -> int:
        """Samples in one analysis window."""
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def n_bins(self) -> int:
        """STFT frequency bins."""
        return self.n_fft // 2 + 1

    @property
    def n_freq(self) -> int:
        """Spectrogram rows: mel bands, or the STFT bins when ``n_mels`` is 0."""
        return self.n_mels or self.n_bins

    @property
    def n_time(self) -> int:
        """STFT frames of a window (centred framing)."""
        return 1 + self.n_samples // self.hop_length

    @property
    def spectrogram_shape(self) -> tuple[int, int]:
        return (self.n_freq, self.n_time)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """Stored frame layout: H x W x RGB, uint8."""
        return (self.frame_size, self.frame_size, 3)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["frame_mean"] = list(self.frame_mean)
        d["frame_std"] = list(self.frame_std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        return cls(**known_fields(cls, d, "preprocessing spec"))

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))


#: Named presets. ``paper``: Sec. 4.1 shapes. ``cpu``: small inputs for 2-core runs (the
#: embedded ``avdigits`` default): 16 kHz (0-8 kHz), 32 ms windows every 10 ms pooled into 32 mel
#: bands -> 32 x 301 log-mel spectrogram, 64 x 64 frames. Chosen on val (``cnn8`` audio
#: encoder as a 10-class classifier on avdigits, 8 epochs): the former 129 linear bins every 30 ms
#: reached 58 %; at 8 kHz, 32 mel bands every 30 ms 71.3 %, every 20 ms 78.2 %, every 10 ms 81.7 %
#: (24 / 40 / 64 bands: 80.2 / 81.3 / 77.3 %; 3 seeds). Mel pooling smooths the pitch harmonics
#: that differ between voices; the finer hop keeps the formant transitions. Then the band
#: (``benchmarks/studies/bench_audio_probe.py``, seeds 1-5, AMD EPYC): 8 kHz 82.5 +- 1.1 %, 16 kHz
#: 85.1 +- 0.7 (higher on every seed: fricatives such as the /s/ of "six" and "seven" lie above
#: 4 kHz), 16 kHz with 40 bands 84.7 +- 2.4, 22,050 Hz 83.0 +- 1.1. The shape, and so the
#: encoder's cost, is the 8 kHz one's.
PRESETS: dict[str, PreprocessSpec] = {
    "paper": PreprocessSpec(),
    "cpu": PreprocessSpec(
        name="cpu", sample_rate=16000, n_fft=512, win_length=512, hop_length=160, n_mels=32, frame_size=64
    ),
}


def get_preset(name: str) -> PreprocessSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing preset {name!r}; choose from {sorted(PRESETS)}") from None


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (the STFT convention, equal to torch.hann_window)."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def fit_window(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Centre-crop or symmetrically zero-pad a mono waveform to exactly ``n_samples``."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    excess = audio.shape[0] - n_samples
    if excess >= 0:
        start = excess // 2
        return audio[start : start + n_samples]
    before = (-excess) // 2
    return np.pad(audio, (before, -excess - before))


def log_spectrogram(spec: PreprocessSpec, audio: np.ndarray) -> np.ndarray:
    """ln(|STFT|^2 + eps) of mono audio (..., n_samples) -> (..., n_freq, n_time) float32; with
    ``n_mels`` the power is pooled into mel bands before the log."""
    audio = np.asarray(audio, dtype=np.float32)
    pad = spec.n_fft // 2
    padded = np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, spec.n_fft, axis=-1)
    frames = frames[..., :: spec.hop_length, :]  # (..., n_time, n_fft)
    window = np.zeros(spec.n_fft, dtype=np.float32)
    offset = (spec.n_fft - spec.win_length) // 2
    window[offset : offset + spec.win_length] = hann_window(spec.win_length)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (..., n_time, n_bins)
    if spec.n_mels:
        power = power @ mel_filterbank(spec).T
    return np.log(power + spec.log_eps).astype(np.float32).swapaxes(-1, -2)


def normalize_spectrogram(spec: PreprocessSpec, log_spec: np.ndarray) -> np.ndarray:
    return ((np.asarray(log_spec, dtype=np.float32) - spec.spec_mean) / spec.spec_std).astype(np.float32)


def resize_frame(spec: PreprocessSpec, rgb: np.ndarray) -> np.ndarray:
    """Any H x W x 3 (or H x W grey) uint8 frame -> frame_size x frame_size x 3 uint8 (area resize)."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 frame, got shape {rgb.shape} dtype {rgb.dtype}")
    size = (spec.frame_size, spec.frame_size)
    if rgb.shape[:2] == size:
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def normalize_frames(spec: PreprocessSpec, frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] and standardised."""
    x = np.asarray(frames, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.frame_mean, np.float32)) / np.asarray(spec.frame_std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
