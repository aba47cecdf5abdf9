"""Camera, video-file and stream sources of the live runtime: a capture thread that keeps only the newest frame.

``--camera`` takes a device index (``0``), a device path (``/dev/video0``), a video file or a
stream URL (``udp://``, ``rtsp://``, ``http://`` ...), all read with OpenCV's capture (V4L2 for
devices, FFmpeg for files and streams). The capture thread replaces the published frame with every
new one (buffer size 1 where the backend allows), so inference never runs on a queued, stale
frame; each frame carries its arrival time so a prediction can record the frame's age.

Files play at real-time pace (the frame shown at wall time t since ``start`` is the one at media
time t; ``realtime=False`` reads them on demand with :meth:`VideoSource.frame_at`). A device or a
stream that stops delivering is reopened with exponential backoff; each gap is recorded, and
:meth:`VideoSource.latest` keeps returning the last frame with its growing age, so the pipeline
decides what a gap means (the runtime marks such predictions audio-only).
"""
from __future__ import annotations

import glob
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

OPEN_TIMEOUT_MS = 5000  # FFmpeg: give up opening a stream after this
READ_TIMEOUT_MS = 1000  # FFmpeg: a read that waits longer counts as a gap
BACKOFF = (0.25, 4.0)  # first and largest wait between reopen attempts, seconds

log = logging.getLogger("cign_runtime")


class VideoSourceError(RuntimeError):
    """A camera, file or stream cannot be opened; the message names it and lists the cameras."""


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray  # (H, W, 3) uint8
    arrived: float  # time.perf_counter() (the latency log's clock) when the capture thread got it
    seq: int  # frames delivered so far, 1-based
    media_time: float  # seconds into a file (files), else seconds since start

    def age(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self.arrived


@dataclass
class VideoStats:
    frames: int = 0
    dropped: int = 0  # frames replaced by a newer one before anybody read them
    reconnects: int = 0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) of each outage, monotonic


def list_cameras() -> list[str]:
    """Video capture device paths present on this machine (Linux V4L2)."""
    return sorted(glob.glob("/dev/video*"))


def kind_of(source: str | int) -> str:
    """"device" (index or /dev path), "stream" (URL) or "file"."""
    text = str(source)
    if isinstance(source, int) or text.isdigit() or text.startswith("/dev/video"):
        return "device"
    return "stream" if "://" in text else "file"


def open_capture(source: str | int) -> cv2.VideoCapture:
    kind = kind_of(source)
    if kind == "device":
        cap = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: hand out the newest frame, not a queued one
        return cap
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
    return cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)


class VideoSource:
    """Newest-frame capture from a camera, file or stream; ``start()`` then ``latest()`` (or ``frame_at``)."""

    def __init__(self, source: str | int, realtime: bool = True, loop: bool = False):
        self.source, self.kind = source, kind_of(source)
        self.realtime, self.loop = realtime, loop
        self.stats = VideoStats()
        self._cap: cv2.VideoCapture | None = None
        self._latest: Frame | None = None
        self._read_seq = 0
        self._ahead: tuple[np.ndarray, float] | None = None  # frame_at's next frame and its media time
        self._stop = threading.Event()
        self._fresh = threading.Condition()  # notified by the capture thread on every new frame
        self._thread: threading.Thread | None = None
        self.ended = False  # a file played to its end (and does not loop)

    # ----------------------------------------------------------------------------- opening
    def _open(self) -> cv2.VideoCapture:
        cap = open_capture(self.source)
        if not cap.isOpened():
            cap.release()
            raise VideoSourceError(self._cannot_open())
        return cap

    def _cannot_open(self) -> str:
        if self.kind == "file" and not Path(str(self.source)).is_file():
            return f"camera {self.source!r}: no such device or file"
        cams = list_cameras()
        return (f"camera {self.source!r} cannot be opened ({self.kind}); cameras on this machine: "
                f"{', '.join(cams) if cams else 'none'}")

    def start(self) -> "VideoSource":
        self._cap = self._open()
        self._t0 = time.perf_counter()
        if self.realtime or self.kind != "file":
            self._thread = threading.Thread(target=self._run, name=f"video {self.source}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cap is not None:
            self._cap.release()

    def __enter__(self) -> "VideoSource":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ reading
    def latest(self) -> Frame | None:
        """The newest frame (None before the first); marks it read for the dropped-frame count."""
        frame = self._latest
        if frame is not None:
            self._read_seq = frame.seq
        return frame

    @property
    def seq(self) -> int:
        """Frames delivered so far (the newest frame's ``seq``; 0 before the first)."""
        frame = self._latest
        return 0 if frame is None else frame.seq

    def wait_newer(self, seq: int, timeout: float) -> Frame | None:
        """The newest frame as soon as one newer than ``seq`` arrived (or the file ended), else after ``timeout`` s."""
        with self._fresh:
            self._fresh.wait_for(lambda: self.ended or (self._latest is not None and self._latest.seq > seq), timeout)
        return self.latest()

    def frame_at(self, t: float) -> Frame | None:
        """Files with ``realtime=False``: the frame shown at media time ``t`` (reads forward only)."""
        if self.kind != "file" or self.realtime:
            raise ValueError("frame_at is for files opened with realtime=False")
        while not self.ended:
            if self._ahead is None:
                ok, bgr = self._cap.read()
                if not ok:
                    self.ended = True
                    break
                self._ahead = (bgr, self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
            if self._ahead[1] > t and self._latest is not None:
                break
            self._publish(*self._ahead)
            self._ahead = None
        return self.latest()

    def _publish(self, bgr: np.ndarray, media_time: float) -> Frame:
        if self._latest is not None and self._latest.seq != self._read_seq and self.realtime:
            self.stats.dropped += 1
        self.stats.frames += 1
        frame = Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.perf_counter(), self.stats.frames, media_time)
        self._latest = frame  # one reference swap: readers see the old or the new frame, never a torn one
        with self._fresh:
            self._fresh.notify_all()
        return frame

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.perf_counter()
            ok, bgr = self._cap.read()
            if ok and self.kind == "stream" and time.perf_counter() - asked >= 0.95 * READ_TIMEOUT_MS / 1000:
                ok = False  # FFmpeg's read timeout fired: it hands back its last frame again, not a new one
            if ok:
                if self.kind == "file":
                    pos = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    wait = self._t0 + pos - time.perf_counter()  # real-time pace: show frame at its media time
                    if wait > 0 and self._stop.wait(wait):
                        break
                    self._publish(bgr, pos)
                else:
                    self._publish(bgr, time.perf_counter() - self._t0)
            elif self.kind == "file":
                if not self.loop:
                    self.ended = True
                    with self._fresh:
                        self._fresh.notify_all()
                    break
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                self._t0 = time.perf_counter()
            else:
                self._reconnect()

    def _reconnect(self) -> None:
        """Reopen a device or stream that stopped delivering, with exponential backoff; record the gap."""
        gap_start = self._latest.arrived if self._latest is not None else time.perf_counter()
        wait = BACKOFF[0]
        log.warning("camera %s: no frame since %.1f s; reconnecting", self.source, time.perf_counter() - gap_start)
        self._cap.release()
        while not self._stop.wait(wait):
            cap = open_capture(self.source)
            if cap.isOpened():
                ok, bgr = cap.read()
                if ok:
                    self._cap = cap
                    self.stats.reconnects += 1
                    self.stats.gaps.append((gap_start, time.perf_counter() - gap_start))
                    log.warning("camera %s: back after a %.1f s gap", self.source, self.stats.gaps[-1][1])
                    self._publish(bgr, time.perf_counter() - self._t0)
                    return
            cap.release()
            wait = min(2 * wait, BACKOFF[1])
        self._cap = cv2.VideoCapture()  # stopped during the gap: nothing left to release
