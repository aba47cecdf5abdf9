"""Audio sources of the live runtime: a microphone (PortAudio via sounddevice) or a media file.

Both give :meth:`window` -> (the newest ``window_seconds`` of mono float32 audio at the model's
sample rate, its age in seconds). The PortAudio callback only copies into a preallocated
:class:`RingBuffer` and records its own duration and the overflow/underflow flags; it takes no
lock and does no I/O. Resampling to the model rate (soxr) happens in the reader's thread.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import av
import numpy as np
import sounddevice as sd
import soxr


class AudioSourceError(RuntimeError):
    """An audio input that cannot be opened: unknown device, file without audio, ..."""


class RingBuffer:
    """Single-writer ring of float32 samples; readers copy the newest samples without a lock.

    :meth:`write` allocates no sample memory (only transient views). ``written`` counts every
    sample ever written and advances after the data is in place; a reader that sees it advance by
    more than ``capacity - n`` while copying ``n`` samples retries, so a window is never torn by a
    concurrent wrap (given single writes of at most ``capacity - n`` samples).
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self._view = memoryview(self._buf)
        self.written = 0

    def write(self, samples: np.ndarray) -> None:
        """Append 1-D float32 samples (the writer's thread only).

        Copies go through memoryviews: a plain memcpy that, unlike numpy's copy of larger
        blocks, never releases the GIL, so the writer never waits to take it back mid-write.
        """
        src = memoryview(samples)
        n = src.shape[0]
        if n > self.capacity:
            src = src[n - self.capacity :]
            self.written += n - self.capacity
            n = self.capacity
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        self._view[start : start + first] = src[:first]
        if first < n:
            self._view[: n - first] = src[first:]
        self.written += n  # publish after the data is in place

    def newest(self, n: int) -> tuple[np.ndarray, int]:
        """(a copy of the newest ``n`` samples, zero-padded at the front before that many arrived,
        the ``written`` count it ends at)."""
        if not 0 < n <= self.capacity // 2:
            raise ValueError(f"can read 1..{self.capacity // 2} samples from a ring of {self.capacity}, not {n}")
        out = np.zeros(n, dtype=np.float32)
        while True:
            end = self.written
            have = min(n, end)
            start = (end - have) % self.capacity
            first = min(have, self.capacity - start)
            out[n - have : n - have + first] = self._buf[start : start + first]
            out[n - have + first :] = self._buf[: have - first]
            # The writer overwrote our oldest sample only if it advanced past capacity - n.
            if self.written - end <= self.capacity - n:
                return out, end


def list_inputs() -> list[tuple[int, str, int, float]]:
    """(index, name, input channels, default sample rate) of every PortAudio input device."""
    return [(d["index"], d["name"], d["max_input_channels"], d["default_samplerate"])
            for d in sd.query_devices() if d["max_input_channels"] > 0]


def _inputs_listing() -> str:
    rows = [f"  {i}: {name} ({ch} ch, {rate:g} Hz)" for i, name, ch, rate in list_inputs()]
    return "available input devices:\n" + "\n".join(rows) if rows else "no audio input devices are available"


def resolve_input(device: str | int) -> int:
    """PortAudio index of ``"default"``, an index or a (case-insensitive) name substring."""
    inputs = list_inputs()
    if str(device).strip().lower() == "default":
        index = sd.default.device[0]
        if index is None or index < 0 or index not in [i for i, *_ in inputs]:
            raise AudioSourceError(f"there is no default audio input device; {_inputs_listing()}")
        return int(index)
    if isinstance(device, int) or str(device).strip().isdigit():
        index = int(device)
        if index not in [i for i, *_ in inputs]:
            raise AudioSourceError(f"audio input device {index} not found; {_inputs_listing()}")
        return index
    name = str(device).strip().lower()
    exact = [i for i, n, *_ in inputs if n.lower() == name]
    matches = exact or [i for i, n, *_ in inputs if name in n.lower()]
    if len(matches) != 1:
        what = "matches several input devices" if matches else "matches no input device"
        raise AudioSourceError(f"audio input {device!r} {what} (and is not a file); {_inputs_listing()}")
    return matches[0]


@dataclass(frozen=True)
class MicStats:
    """Callback health of a :class:`MicSource`; durations in seconds."""

    callbacks: int
    overflows: int
    underflows: int
    callback_max_s: float
    callback_p99_s: float
    slow_callbacks: int = 0  # callbacks that took longer than SLOW_CALLBACK_S


class MicSource:
    """A PortAudio input stream at the device's rate, mono, read as model-rate windows.

    ``device``: ``"default"``, an index or a name substring. ``device_rate`` defaults to the
    device's default rate; ``blocksize`` 0 lets PortAudio choose; ``latency`` is PortAudio's
    suggested input latency (``"low"``: the device's low-latency setting; through PulseAudio it cut
    the newest sample's age at p99 from 17 to 4 ms, ``benchmarks/bench_live.py``); ``channels`` > 1
    are down-mixed (their mean) in the callback. The ring holds ``ring_seconds`` (at least twice the
    window).
    """

    #: Callback durations kept for the p99 (the newest this many callbacks).
    DURATION_HISTORY = 8192
    #: A callback longer than this is counted as slow (the runtime's budget for it).
    SLOW_CALLBACK_S = 1e-3

    def __init__(self, device: str | int, sample_rate_model: int, window_seconds: float,
                 device_rate: int | None = None, blocksize: int = 0, channels: int = 1, ring_seconds: float = 10.0,
                 latency: str | float = "low"):
        self.device = resolve_input(device)
        info = sd.query_devices(self.device)
        self.device_name = info["name"]
        self.device_rate = int(device_rate or info["default_samplerate"])
        self.sample_rate = int(sample_rate_model)
        self.window_seconds = float(window_seconds)
        self.n_samples = int(round(self.window_seconds * self.sample_rate))
        self.blocksize = int(blocksize)
        self.latency = latency
        # Device-rate samples per window, plus 50 ms of resampler run-in at the old end.
        self._n_device = int(math.ceil(self.window_seconds * self.device_rate)) + self.device_rate // 20
        capacity = max(int(ring_seconds * self.device_rate), 2 * self._n_device)
        self.ring = RingBuffer(capacity)
        self.channels = int(channels)
        self._channels = self.channels
        self._mix = np.zeros(0, dtype=np.float32)
        self._durations = np.zeros(self.DURATION_HISTORY, dtype=np.float64)
        self._callbacks = 0
        self._overflows = 0
        self._underflows = 0
        self._max_duration = 0.0
        self._slow = 0
        self._last_arrival = -math.inf
        self._stream: sd.InputStream | None = None

    def _callback(self, indata: np.ndarray, frames: int, time_info, status: sd.CallbackFlags) -> None:
        t0 = time.perf_counter()
        if status:
            if status.input_overflow:
                self._overflows += 1
            if status.input_underflow:
                self._underflows += 1
        if self._channels == 1:
            self.ring.write(indata[:, 0])
        else:
            mixed = self._mix[:frames]
            np.mean(indata, axis=1, out=mixed)
            self.ring.write(mixed)
        self._last_arrival = t0
        duration = time.perf_counter() - t0
        self._durations[self._callbacks % self.DURATION_HISTORY] = duration
        self._callbacks += 1
        if duration > self._max_duration:
            self._max_duration = duration
        if duration > self.SLOW_CALLBACK_S:
            self._slow += 1

    def _open(self, channels: int) -> sd.InputStream:
        self._channels = channels
        if channels > 1:  # down-mix scratch, sized for the largest block the ring takes
            self._mix = np.zeros(self.ring.capacity, dtype=np.float32)
        return sd.InputStream(device=self.device, samplerate=self.device_rate, channels=channels, dtype="float32",
                              blocksize=self.blocksize, latency=self.latency, callback=self._callback)

    def start(self) -> "MicSource":
        """Open and start the stream; a device that refuses ``channels`` is opened with its first two."""
        if self._stream is not None:
            return self
        try:
            try:
                stream = self._open(self.channels)
            except sd.PortAudioError:
                stream = self._open(min(2, sd.query_devices(self.device)["max_input_channels"]))
            self._last_arrival = time.perf_counter()  # before the first callback, ages count from the start
            stream.start()
        except sd.PortAudioError as e:
            raise AudioSourceError(f"cannot open audio input {self.device}: {self.device_name!r} at "
                                   f"{self.device_rate} Hz: {e}; {_inputs_listing()}") from e
        self._stream = stream
        return self

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    def __enter__(self) -> "MicSource":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self) -> tuple[np.ndarray, float]:
        """(newest ``window_seconds`` at the model rate, seconds since its newest sample arrived).

        Before the first callback the window is silence and its age counts from ``start()``.
        """
        raw, _ = self.ring.newest(self._n_device)
        age = time.perf_counter() - self._last_arrival
        if self.device_rate != self.sample_rate:
            raw = soxr.resample(raw, self.device_rate, self.sample_rate, quality="HQ")
        out = raw[-self.n_samples :]
        if out.shape[0] < self.n_samples:
            out = np.pad(out, (self.n_samples - out.shape[0], 0))
        return np.ascontiguousarray(out, dtype=np.float32), age

    def stats(self) -> MicStats:
        n = min(self._callbacks, self.DURATION_HISTORY)
        p99 = float(np.percentile(self._durations[:n], 99)) if n else 0.0
        return MicStats(self._callbacks, self._overflows, self._underflows, self._max_duration, p99, self._slow)


def decode_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """The audio stream of an audio or video file as mono float32 at ``sample_rate`` (channel mean)."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise AudioSourceError(f"cannot open media file {str(path)!r}: {e}") from e
    with container:
        if not container.streams.audio:
            raise AudioSourceError(f"media file {str(path)!r} has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)


class FileAudioSource:
    """A media file's audio played as a live input.

    ``realtime``: media time follows the wall clock from :meth:`start` (a recorded clip behaves
    like a device). Otherwise each :meth:`window` call advances media time by ``step_seconds``,
    as fast as the caller reads. ``loop`` restarts at the end; else the end is held (``finished``).
    """

    def __init__(self, path: str | os.PathLike, sample_rate_model: int, window_seconds: float,
                 realtime: bool = True, loop: bool = False, step_seconds: float = 0.5):
        self.path = str(path)
        self.sample_rate = int(sample_rate_model)
        self.window_seconds = float(window_seconds)
        self.n_samples = int(round(self.window_seconds * self.sample_rate))
        self.realtime = realtime
        self.loop = loop
        self.step_seconds = float(step_seconds)
        self.audio = decode_audio(path, self.sample_rate)
        if self.audio.shape[0] == 0:
            raise AudioSourceError(f"media file {self.path!r} has an empty audio stream")
        self.duration = self.audio.shape[0] / self.sample_rate
        self._started_at: float | None = None
        self._steps = 0

    def start(self) -> "FileAudioSource":
        if self._started_at is None:
            self._started_at = time.perf_counter()
        return self

    def stop(self) -> None:
        self._started_at = None

    def __enter__(self) -> "FileAudioSource":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _elapsed(self) -> float:
        """Media seconds played so far, before looping or clamping."""
        if not self.realtime:
            return self._steps * self.step_seconds
        if self._started_at is None:
            raise AudioSourceError(f"audio file source {self.path!r} is not started")
        return time.perf_counter() - self._started_at

    def _media_time(self, elapsed: float) -> float:
        return elapsed % self.duration if self.loop else min(elapsed, self.duration)

    @property
    def position(self) -> float:
        """Current media time in seconds."""
        return self._media_time(self._elapsed())

    @property
    def finished(self) -> bool:
        return not self.loop and self._elapsed() >= self.duration

    def window_at(self, t: float) -> np.ndarray:
        """The ``window_seconds`` ending at media time ``t`` (zeros outside the file, wrapped if looping)."""
        end = int(round(t * self.sample_rate))
        idx = np.arange(end - self.n_samples, end)
        if self.loop:
            return self.audio[idx % self.audio.shape[0]]
        out = np.zeros(self.n_samples, dtype=np.float32)
        valid = (idx >= 0) & (idx < self.audio.shape[0])
        out[valid] = self.audio[idx[valid]]
        return out

    def window(self) -> tuple[np.ndarray, float]:
        """(the window ending at the current media time, seconds since the file ran out or 0).

        Without ``realtime`` the call first advances media time by ``step_seconds``.
        """
        if not self.realtime:
            self._steps += 1
        elapsed = self._elapsed()
        age = 0.0 if self.loop else max(0.0, elapsed - self.duration)
        return self.window_at(self._media_time(elapsed)), age


def open_audio(arg: str | int, sample_rate: int, window_seconds: float,
               realtime: bool = True, loop: bool = False) -> MicSource | FileAudioSource:
    """``--mic``: an existing audio/video file (``loop``: restart at its end), else ``"default"``, a device
    index or a name substring."""
    if isinstance(arg, str) and os.path.isfile(arg):
        return FileAudioSource(arg, sample_rate, window_seconds, realtime=realtime, loop=loop)
    return MicSource(arg, sample_rate, window_seconds)
