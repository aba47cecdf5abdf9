"""Torch implementation of :class:`cign_runtime.spec.PreprocessSpec` (the numpy one is in the spec).

``cign-prepare`` computes the stored log spectrograms with :func:`log_spectrogram`; training
normalises stored uint8 frames and float16 spectrograms on the device with
:func:`normalize_frames` / :func:`normalize_spectrogram`. ``tests/test_spec_parity.py`` checks
each against its numpy twin.
"""
from __future__ import annotations

import torch

from cign_runtime.spec import PreprocessSpec, mel_filterbank


def log_spectrogram(spec: PreprocessSpec, audio: torch.Tensor) -> torch.Tensor:
    """ln(|STFT|^2 + eps) of mono audio (..., n_samples) -> (..., n_freq, n_time) float32; with
    ``n_mels`` the power is pooled by the spec's mel filterbank before the log."""
    lead = audio.shape[:-1]
    window = torch.hann_window(spec.win_length, periodic=True, dtype=torch.float32, device=audio.device)
    stft = torch.stft(
        audio.reshape(-1, audio.shape[-1]).float(),
        n_fft=spec.n_fft,
        hop_length=spec.hop_length,
        win_length=spec.win_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (B, n_bins, n_time)
    power = stft.real.square() + stft.imag.square()
    if spec.n_mels:
        power = torch.tensor(mel_filterbank(spec), device=power.device) @ power
    return torch.log(power + spec.log_eps).reshape(*lead, *power.shape[-2:])


def normalize_spectrogram(spec: PreprocessSpec, log_spec: torch.Tensor) -> torch.Tensor:
    return (log_spec.float() - spec.spec_mean) / spec.spec_std


def normalize_frames(spec: PreprocessSpec, frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] and standardised."""
    mean = torch.tensor(spec.frame_mean, dtype=torch.float32, device=frames.device)
    std = torch.tensor(spec.frame_std, dtype=torch.float32, device=frames.device)
    x = (frames.float() / 255.0 - mean) / std
    return x.movedim(-1, -3).contiguous()


def stored_inputs(spec: PreprocessSpec, frames: torch.Tensor, spectrograms: torch.Tensor, device: torch.device,
                  augment=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored batch (uint8 (B, H, W, 3) frames, (B, F, T) log spectrograms) -> the model's inputs on
    ``device``: normalised spectrograms (B, F, T) and channels_last frames (B, 3, H, W), with
    ``augment`` (``cign_train.augment.Augment``) applied to the raw frames and the normalised spectrograms."""
    non_blocking = device.type == "cuda"
    frames = frames.to(device, non_blocking=non_blocking)
    if augment is not None:
        frames = augment.frames(frames)
    frames = normalize_frames(spec, frames).contiguous(memory_format=torch.channels_last)  # faster convolutions
    spectrograms = normalize_spectrogram(spec, spectrograms.to(device, non_blocking=non_blocking))
    if augment is not None:
        spectrograms = augment.spectrograms(spectrograms)
    return spectrograms, frames
