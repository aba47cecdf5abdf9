"""Decode one clip with PyAV into the raw material of a training sample.

The analysis window is ``spec.clip_seconds`` of audio centred on the clip's audio; the frame is
the video frame nearest the window's centre (the reference release's choice for 10 s VGGSound
clips). Audio of any rate or layout is resampled to ``spec.sample_rate`` mono by FFmpeg's
resampler; frames of any pixel format or size are converted to RGB and resized by the spec.

Inputs that cannot give a faithful sample raise :class:`ClipError` naming the file and the
problem; inputs that can be handled exactly are handled (padding is noted in ``DecodedClip.notes``):

* audio shorter than the window but at least ``min_audio_seconds`` long: zero-padded symmetrically;
* other sample rates, stereo/multichannel audio: resampled and down-mixed to mono;
* grey-scale or odd-sized frames: converted to RGB and resized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from cign_runtime.spec import PreprocessSpec, fit_window, resize_frame

#: Peak amplitude below which a window counts as silent (-80 dBFS).
SILENCE_PEAK = 1e-4


class ClipError(Exception):
    """A clip that cannot become a sample. ``reason`` is a short machine-friendly tag."""

    def __init__(self, path: Path | str, reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}: {detail}")


@dataclass
class DecodedClip:
    frame: np.ndarray  # frame_size x frame_size x 3 uint8
    audio: np.ndarray  # (spec.n_samples,) float32 mono at spec.sample_rate
    notes: list[str] = field(default_factory=list)


def _decode_audio(container: av.container.InputContainer, stream, sample_rate: int):
    """All audio of ``stream`` as float32 mono at ``sample_rate`` plus its start time (s)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, start = [], None
    for frame in container.decode(stream):
        if start is None and frame.time is not None:
            start = float(frame.time)
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio.astype(np.float32, copy=False), (start or 0.0)


def _frame_at(container: av.container.InputContainer, stream, t: float) -> np.ndarray | None:
    """RGB frame of ``stream`` whose timestamp is nearest ``t`` seconds."""
    if stream.time_base is not None:
        container.seek(max(0, int(t / stream.time_base)), stream=stream, backward=True, any_frame=False)
    best, best_dt = None, float("inf")
    for frame in container.decode(stream):
        ft = float(frame.time) if frame.time is not None else t
        if abs(ft - t) <= best_dt:
            best, best_dt = frame, abs(ft - t)
        elif ft > t:
            break
    return None if best is None else best.to_ndarray(format="rgb24")


def decode_clip(path: Path | str, spec: PreprocessSpec, min_audio_seconds: float = 1.0) -> DecodedClip:
    """Decode ``path`` into a resized frame and a ``spec.clip_seconds`` mono window."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(path, "missing file", "no such file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ClipError(path, "unreadable", f"cannot open as media ({e})") from e
    notes: list[str] = []
    with container:
        if not container.streams.audio:
            raise ClipError(path, "no audio stream", "the file has no audio stream")
        if not container.streams.video:
            raise ClipError(path, "no video stream", "the file has no video stream")
        astream, vstream = container.streams.audio[0], container.streams.video[0]
        try:
            audio, start = _decode_audio(container, astream, spec.sample_rate)
        except av.error.FFmpegError as e:
            raise ClipError(path, "corrupt", f"audio decoding failed ({e})") from e
        seconds = audio.shape[0] / spec.sample_rate
        if seconds < min_audio_seconds:
            raise ClipError(
                path, "too short", f"{seconds:.2f} s of audio, need at least {min_audio_seconds:g} s"
            )
        if audio.shape[0] < spec.n_samples:
            notes.append(f"padded {seconds:.2f} s of audio to {spec.clip_seconds:g} s")
        centre = start + seconds / 2
        window = fit_window(audio, spec.n_samples)
        peak = float(np.abs(window).max())
        if peak < SILENCE_PEAK:
            raise ClipError(path, "silent", f"audio window peak {peak:.1e} is below {SILENCE_PEAK:.0e}")
        try:
            rgb = _frame_at(container, vstream, centre)
        except av.error.FFmpegError as e:
            raise ClipError(path, "corrupt", f"video decoding failed ({e})") from e
        if rgb is None:
            raise ClipError(path, "no video frames", "the video stream decoded to no frames")
    return DecodedClip(frame=resize_frame(spec, rgb), audio=window, notes=notes)
