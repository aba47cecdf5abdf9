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
#: Which analysis window of a clip longer than it becomes the sample (``cign-prepare --window``).
WINDOWS = ("center", "loudest")


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


def window_start(audio: np.ndarray, n: int, window: str, rate: int) -> int:
    """First sample of the ``n``-sample analysis window in ``audio`` (longer than ``n``).

    ``center``: the centred window (VGGSound clips are cut around their event). ``loudest``: the
    window with the most energy, searched on a 10 ms grid (user clips whose sound is off-centre).
    """
    if window == "center":
        return (audio.shape[0] - n) // 2
    if window != "loudest":
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    energy = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64))])
    starts = np.arange(0, audio.shape[0] - n + 1, max(1, rate // 100))
    return int(starts[np.argmax(energy[starts + n] - energy[starts])])


def loud_span(audio: np.ndarray, rate: int, start: float) -> str:
    """Where ``audio`` (starting at ``start`` s) exceeds the silence threshold, as 'a-b s', or ''."""
    loud = np.flatnonzero(np.abs(audio) >= SILENCE_PEAK)
    return "" if loud.size == 0 else f"{start + loud[0] / rate:.2f}-{start + (loud[-1] + 1) / rate:.2f} s"


def decode_clip(path: Path | str, spec: PreprocessSpec, min_audio_seconds: float = 1.0,
                window: str = "center") -> DecodedClip:
    """Decode ``path`` into a resized frame and a ``spec.clip_seconds`` mono window (``window``: which
    ``spec.clip_seconds`` of a longer clip, see :func:`window_start`; the frame is the one at its centre)."""
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
        if audio.shape[0] > spec.n_samples:
            first = window_start(audio, spec.n_samples, window, spec.sample_rate)
            samples = audio[first : first + spec.n_samples]
            span = (start + first / spec.sample_rate, start + (first + spec.n_samples) / spec.sample_rate)
        else:
            samples = fit_window(audio, spec.n_samples)
            span = (start, start + seconds)
        centre = (span[0] + span[1]) / 2
        peak = float(np.abs(samples).max())
        if peak < SILENCE_PEAK:
            elsewhere = loud_span(audio, spec.sample_rate, start)
            hint = (f"; the clip has sound at {elsewhere} (--window loudest takes the loudest {spec.clip_seconds:g} s)"
                    if elsewhere else "; the whole clip is silent")
            raise ClipError(path, "silent", f"the {window} audio window {span[0]:.2f}-{span[1]:.2f} s peaks at "
                                            f"{peak:.1e}, below {SILENCE_PEAK:.0e}{hint}")
        try:
            rgb = _frame_at(container, vstream, centre)
        except av.error.FFmpegError as e:
            raise ClipError(path, "corrupt", f"video decoding failed ({e})") from e
        if rgb is None:
            raise ClipError(path, "no video frames", "the video stream decoded to no frames")
    return DecodedClip(frame=resize_frame(spec, rgb), audio=samples, notes=notes)
