"""Writing one clip as an mp4: H.264 video (yuv420p) and mono AAC audio, with PyAV."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray, sample_rate: int) -> None:
    """Write frames (T, H, W, 3) uint8 RGB and mono float32 audio to ``path``.

    Encoders run single-threaded, so the bytes depend only on the inputs; the file appears
    under its name only once complete.
    """
    partial = path.with_name(path.name + ".part")
    with av.open(str(partial), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        sound = container.add_stream("aac", rate=sample_rate, layout="mono", options={"aac_coder": "fast"})
        sound.codec_context.thread_count = 1
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        chunk = 1024  # AAC frame size
        for start in range(0, len(audio), chunk):
            block = av.AudioFrame.from_ndarray(audio[None, start : start + chunk], format="flt", layout="mono")
            block.sample_rate, block.pts, block.time_base = sample_rate, start, Fraction(1, sample_rate)
            container.mux(sound.encode(block))
        container.mux(sound.encode())
    os.replace(partial, path)
