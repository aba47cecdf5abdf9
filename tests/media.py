"""Real media files for tests, encoded with PyAV (H.264 / AAC in mp4 unless told otherwise)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    """(channels, n) float32 sine; channel c is at freq * (c + 1)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def gradient_frame(width: int, height: int, t: int = 0) -> np.ndarray:
    """An RGB test pattern whose colours change with ``t``."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1) + t) % 256, (y * 255 // max(1, height - 1)) % 256,
                     np.full_like(x, (40 * t) % 256)], axis=-1).astype(np.uint8)


def write_clip(
    path: Path,
    seconds: float = 4.0,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int = 22050,
    channels: int = 1,
    width: int = 96,
    height: int = 64,
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    with_video: bool = True,
    with_audio: bool = True,
    frame_fn=gradient_frame,
) -> Path:
    """Encode a clip; ``audio`` (channels, n) float32 defaults to a tone of ``seconds``."""
    path = Path(path)
    if audio is None:
        audio = tone(seconds, sample_rate, channels=channels)
    with av.open(str(path), "w") as out:
        if with_video:
            v = out.add_stream(codec, rate=fps)
            v.width, v.height, v.pix_fmt = width, height, pix_fmt
        if with_audio:
            a = out.add_stream("aac", rate=sample_rate)
            a.layout = "mono" if channels == 1 else "stereo"
        if with_video:
            for i in range(int(round(seconds * fps))):
                img = frame_fn(width, height, i)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in v.encode(frame):
                    out.mux(packet)
            for packet in v.encode():
                out.mux(packet)
        if with_audio:
            block = 1024
            for start in range(0, audio.shape[1], block):
                chunk = np.ascontiguousarray(audio[:, start : start + block])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=a.layout.name)
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                for packet in a.encode(frame):
                    out.mux(packet)
            for packet in a.encode():
                out.mux(packet)
    return path
