"""Real media files for tests, encoded with PyAV (H.264 / AAC in mp4 unless told otherwise)."""
from __future__ import annotations

from fractions import Fraction
import socket
import threading
import time
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


def index_frame(width: int, height: int, t: int) -> np.ndarray:
    """Frame t is a flat grey of level 10 * t: its content says which frame it is."""
    return np.full((height, width, 3), (10 * t) % 256, dtype=np.uint8)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streamer:
    """MPEG-TS over UDP on 127.0.0.1 written with PyAV at ``fps`` until stopped (a context manager).

    Frame t is ``frames[t % len(frames)]`` (RGB arrays of one size), by default a 64x48 grey of level
    10 * t (``index_frame``, cycling over 25 levels), starting at t = ``first``. The frames are
    encoded once (MPEG-1, a keyframe every 5) and the packets re-sent in a loop with advancing
    timestamps, so the stream costs the machine almost nothing beyond what a camera would.
    """

    def __init__(self, port: int, first: int = 0, fps: int = 25, frames: list[np.ndarray] | None = None):
        frames = frames if frames is not None else [index_frame(64, 48, t) for t in range(25)]
        self.frames = frames[first % len(frames):] + frames[: first % len(frames)]
        self.port, self.fps = port, fps
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        height, width = self.frames[0].shape[:2]
        with av.open(f"udp://127.0.0.1:{self.port}?pkt_size=1316", "w", format="mpegts") as out:
            stream = out.add_stream("mpeg1video", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.gop_size = 5
            packets = [p for img in self.frames for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24"))]
            packets += stream.encode()
            stamps = [(p.pts, p.dts, p.time_base) for p in packets]  # in frames (time base 1 / fps)
            start, sent, n = time.perf_counter(), 0, len(self.frames)
            while not self.stop_event.is_set():
                packet, (pts, dts, time_base) = packets[sent % len(packets)], stamps[sent % len(packets)]
                loop = sent // len(packets)
                packet.time_base, packet.pts, packet.dts = time_base, pts + loop * n, dts + loop * n
                out.mux(packet)
                sent += 1
                self.stop_event.wait(max(0.0, start + sent / self.fps - time.perf_counter()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=5)
