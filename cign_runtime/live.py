"""The live loop: every hop, the newest frame and the newest audio window -> p_a, p_v, p_av (Sec. 3.3).

Per prediction: preprocessing with the manifest's spec (numpy, ``cign_runtime.spec``), inference
on a backend (``cign_runtime.backends``), top-k with all three probabilities, the manifest's
confidence rule ("no known source" below its threshold), optional smoothing over the last n
predictions, then the outputs (JSON lines, an annotated display or recording) and one latency
record per prediction (``cign_runtime.latency``).

Camera gaps: while the newest frame is older than ``stale_after`` seconds (a camera or stream that
disappeared and is being reconnected), predictions use p_audio alone and say ``"modality":
"audio"``; the audio keeps flowing. File inputs without ``realtime`` are stepped on a media clock
(prediction i sees media time (i + 1) * hop), so a recorded clip is classified deterministically
and as fast as the machine allows.

Frame-triggered timing: in real time, a prediction that is due waits up to ``frame_wait`` (0.1 s)
for the next frame to arrive and starts as soon as it does, so the frame it classifies is fresh (its
age is the capture thread's wake-up, not up to one frame interval: at 25 fps that takes 0-40 ms
out of every answer's end-to-end latency; ``benchmarks/bench_live.py`` measures it). The schedule
stays on the hop grid: the wait delays one prediction, not the next.

Hot swap: with ``updates`` (a ``cign_runtime.swap.Watcher``) the loop takes a newer version of the export
between two predictions; each prediction says which revision made it, and the latency log counts swaps
(``swap``, ``swap_refused``) and carries the swap's details on the first record after it.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import av
import cv2
import numpy as np

from cign_runtime import manifest as mf
from cign_runtime.confidence import top_confidence
from cign_runtime.latency import LatencyLog, Stopwatch
from cign_runtime.spec import log_spectrogram, resize_frame

UNKNOWN = "no known source"


@dataclass(frozen=True)
class LiveOptions:
    hop: float = 0.25  # seconds between predictions
    topk: int = 3
    smooth: int = 1  # predictions averaged (1: off)
    realtime: bool = True  # False: step file inputs on a media clock, as fast as possible
    max_seconds: float | None = None
    max_predictions: int | None = None
    stale_after: float = 1.0  # a frame older than this (s) makes the prediction audio-only
    frame_wait: float = 0.1  # realtime: wait up to this (s) for the next frame to arrive


def preprocess(spec, rgb: np.ndarray | None, audio: np.ndarray) -> dict[str, np.ndarray]:
    """A frame (any size, RGB uint8; None: black) and the audio window -> the graph's batch-1 feed."""
    frame = np.zeros(spec.frame_shape, np.uint8) if rgb is None else resize_frame(spec, rgb)
    return mf.feed(frame[None], log_spectrogram(spec, audio)[None])


class Preprocessor:
    """:func:`preprocess` with the frame resize on a helper thread, overlapping the audio work.

    ``__call__(rgb, audio_fn)`` starts resizing the frame, then calls ``audio_fn()`` (the source's
    newest window: a microphone resamples it here) and computes its log spectrogram, then joins.
    OpenCV's resize, soxr and numpy's FFT release the GIL, so on two cores the resize (1.0 ms for a
    640x480 frame at the paper preset) hides behind the audio work (resampling 0.7 ms + spectrogram
    1.3 ms): ``benchmarks/bench_live.py`` measures both. The feed equals :func:`preprocess`'s.
    """

    def __init__(self, spec):
        self.spec = spec
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="resize")

    def __call__(self, rgb: np.ndarray | None, audio_fn: Callable[[], tuple[np.ndarray, float]]):
        """(the batch-1 feed, whatever ``audio_fn`` returned with the window)."""
        resized = self._pool.submit(resize_frame, self.spec, rgb) if rgb is not None else None
        audio, info = audio_fn()
        spectrogram = log_spectrogram(self.spec, audio)
        frame = np.zeros(self.spec.frame_shape, np.uint8) if resized is None else resized.result()
        return mf.feed(frame[None], spectrogram[None]), info

    def close(self) -> None:
        self._pool.shutdown()


def top_k(scores: dict[str, np.ndarray], key: str, classes: list[str], k: int) -> list[dict]:
    """The k best classes by ``scores[key]`` (K,), each with p_av, p_audio and p_visual."""
    order = np.argsort(-scores[key])[:k]
    return [{"class": classes[i], **{name: round(float(scores[name][i]), 6) for name in mf.OUTPUTS}} for i in order]


#: The overlay's line for each event of a live enrolment or swap (``--enroll``; ``cign_runtime.swap``).
NOTICES = {
    "prompt": "shot {shot}/{of}: recording in {countdown_s:g} s",
    "recording": "recording shot {shot}/{of} ({seconds:g} s)",
    "shot": "shot {shot} taken",
    "refused": "shot {shot} refused: {reason}",
    "fitting": "learning '{name}' from {shots} shots",
    "enrolled": "learned '{name}'",
    "enroll_failed": "enrolment failed: {reason}",
    "swap": "now running revision {revision}",
    "swap_refused": "revision {revision} refused: {reason}",
}


def notice(event: dict) -> str:
    """The overlay's line for an event dict (``NOTICES``; another kind shows its name)."""
    return NOTICES.get(event["event"], "{event}").format(**event)


def overlay(rgb: np.ndarray, result: dict, fps: float, note: str = "") -> np.ndarray:
    """A BGR copy of the frame with the top-k classes, p_av / p_a / p_v bars, fps and latency, and ``note``
    (an enrolment prompt) above the bottom line."""
    h, w = rgb.shape[:2]
    scale = max(1.0, 480 / w)
    img = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (int(w * scale), int(h * scale)), interpolation=cv2.INTER_NEAREST)
    head = result["label"] + ("" if result["modality"] == "audio_visual" else " (audio only)")
    cv2.putText(img, head, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    for row, item in enumerate(result["top"]):
        y = 48 + 22 * row
        cv2.putText(img, item["class"], (8, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        for col, (name, colour) in enumerate((("p_av", (0, 200, 0)), ("p_audio", (200, 120, 0)), ("p_visual", (0, 120, 200)))):
            x = 100 + 70 * col
            cv2.rectangle(img, (x, y), (x + int(60 * item[name]), y + 12), colour, -1)
    cv2.putText(img, f"{fps:.1f} pred/s  {result['latency_ms']:.0f} ms", (8, img.shape[0] - 8),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    if note:
        cv2.putText(img, note[: img.shape[1] // 9], (8, img.shape[0] - 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 255, 255), 1)
    return img


class Live:
    """Runs the loop over a model and two started sources until a limit, the end of the files, or ``stop()``.

    ``updates``: a ``cign_runtime.swap.Watcher`` whose prepared versions replace ``model`` between predictions."""

    def __init__(self, model, video, audio, options: LiveOptions, log: LatencyLog,
                 sinks: list[Callable[[dict, np.ndarray | None], None]], updates=None):
        self.model, self.video, self.audio, self.opt, self.log, self.sinks = model, video, audio, options, log, sinks
        self.updates = updates
        self._note: dict[str, object] = {}  # swap details for the next latency record
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=max(1, options.smooth))
        self.preprocess = Preprocessor(model.spec)
        self.stopped = threading.Event()
        self.predictions = 0
        self._last_seq = -1
        self._dropped = 0
        self._reconnects = 0
        self._overflows = 0

    def stop(self) -> None:
        self.stopped.set()

    def _frame(self, media_t: float):
        """The frame this prediction classifies (None without a camera or before its first frame)."""
        if self.video is None:
            return None
        if self.opt.realtime:
            return self.video.wait_newer(self.video.seq, self.opt.frame_wait)  # the next frame to arrive
        return self.video.frame_at(media_t)

    def _audio(self, media_t: float, start: float) -> tuple[np.ndarray, float]:
        """(the newest window at the model rate, perf_counter of its newest sample, at most ``start``)."""
        if not self.opt.realtime:
            return self.audio.window_at(media_t), start
        asked = time.perf_counter()
        audio, age = self.audio.window()  # a microphone resamples here: timed as preprocessing
        return audio, min(start, asked - age)

    def _count_events(self, frame) -> None:
        if frame is not None:
            if frame.seq == self._last_seq and self.opt.realtime:
                self.log.count("stale_frame")
            self._last_seq = frame.seq
        if self.video is not None and self.video.stats.dropped > self._dropped:
            self.log.count("dropped_frame", self.video.stats.dropped - self._dropped)
            self._dropped = self.video.stats.dropped
        if self.video is not None and self.video.stats.reconnects > self._reconnects:
            self.log.count("camera_gap", self.video.stats.reconnects - self._reconnects)
            self._reconnects = self.video.stats.reconnects
        if hasattr(self.audio, "stats"):  # a microphone; files cannot overflow
            overflows = self.audio.stats().overflows
            if overflows > self._overflows:
                self.log.count("overflow", overflows - self._overflows)
                self._overflows = overflows

    def _take_updates(self) -> None:
        """Between predictions: count refused versions and switch to a prepared one (one reference replaced)."""
        for update in self.updates.take():
            if update.model is None:
                self.log.count("swap_refused")
                self._note.setdefault("swap_refused", []).append(update.record())
                continue
            self.model = update.model
            self.history.clear()  # smoothing must not average two class lists
            self.log.count("swap")
            self._note["swap"] = update.record()

    def step(self, media_t: float) -> dict:
        frame = self._frame(media_t)
        sw = Stopwatch()  # the prediction starts with its frame in hand: ages are >= 0
        sw.age("frame_age", frame.arrived if frame is not None and self.opt.realtime else sw.start)
        self._count_events(frame)
        visual = frame is not None and sw.ms["frame_age"] <= 1e3 * self.opt.stale_after
        if not visual:
            self.log.count("audio_only")
        with sw.stage("preprocess"):
            feed, audio_at = self.preprocess(frame.rgb if frame is not None else None,
                                             lambda: self._audio(media_t, sw.start))
        sw.age("audio_age", audio_at)
        with sw.stage("inference"):
            out = self.model.predict(feed[mf.FRAME], feed[mf.SPECTROGRAM])
        with sw.stage("postprocess"):
            self.history.append({k: v[0] for k, v in out.items()})
            scores = {k: np.mean([h[k] for h in self.history], axis=0) for k in mf.OUTPUTS}
            key = "p_av" if visual else "p_audio"
            conf = self.model.confidence
            top_class, confidence = top_confidence(scores[key], conf.temperature)
            known = bool(confidence >= conf.threshold)
            result = {"t": round(time.time(), 3), "index": self.predictions, "media_time": round(media_t, 3),
                      "revision": self.model.manifest.revision,
                      "modality": "audio_visual" if visual else "audio", "known": known,
                      "label": self.model.classes[int(top_class)] if known else UNKNOWN,
                      "confidence": round(float(confidence), 6),
                      "top": top_k(scores, key, self.model.classes, self.opt.topk),
                      "frame_age_ms": round(sw.ms["frame_age"], 3), "audio_age_ms": round(sw.ms["audio_age"], 3)}
        result["latency_ms"] = (time.perf_counter() - sw.start) * 1e3 + max(sw.ms["frame_age"], sw.ms["audio_age"])
        with sw.stage("output"):
            for sink in self.sinks:
                sink(result, frame.rgb if frame is not None else None)
        self.log.record(sw.finish(), label=result["label"], modality=result["modality"], known=known,
                        revision=result["revision"], **self._note)
        self._note = {}
        self.predictions += 1
        return result

    def _done(self, started: float) -> bool:
        o = self.opt
        if self.stopped.is_set() or (o.max_predictions is not None and self.predictions >= o.max_predictions):
            return True
        if o.max_seconds is not None and time.perf_counter() - started >= o.max_seconds:
            return True
        if not o.realtime:
            return (self.predictions + 1) * o.hop > self.audio.duration + 1e-9
        return getattr(self.audio, "finished", False) and (self.video is None or self.video.ended)

    def run(self) -> int:
        """Predict every ``hop`` seconds (wall clock, or media clock without realtime); returns the count.

        Once per Live: it ends by stopping the preprocessing helper thread."""
        started = time.perf_counter()
        try:
            while not self._done(started):
                if self.updates is not None:
                    self._take_updates()
                if self.opt.realtime:
                    wait = started + (self.predictions + 1) * self.opt.hop - time.perf_counter()
                    if wait > 0 and self.stopped.wait(wait):
                        break
                self.step((self.predictions + 1) * self.opt.hop)
        finally:
            self.preprocess.close()
        return self.predictions


class JsonLines:
    """Sink: one JSON line per prediction (``--headless``); :meth:`event` writes an event line (an ``"event"``
    key and ``t``) between them, from any thread."""

    def __init__(self, stream):
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, result: dict, rgb) -> None:
        self._write(result)

    def event(self, event: dict) -> None:
        self._write({"t": round(time.time(), 3), **event})

    def _write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


class Recorder:
    """Sink: the annotated frames as an H.264 mp4 (``--record``), one frame per prediction at 1 / hop fps."""

    def __init__(self, path: str, hop: float):
        self.container = av.open(path, "w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(1, 1) / Fraction(hop).limit_denominator(1000))
        self.stream.pix_fmt = "yuv420p"
        self.started = time.perf_counter()
        self.size: tuple[int, int] | None = None

    def __call__(self, result: dict, rgb) -> None:
        if rgb is None:
            return
        img = overlay(rgb, result, fps=result["index"] / max(1e-9, time.perf_counter() - self.started))
        if self.size is None:
            self.size = (img.shape[1] // 2 * 2, img.shape[0] // 2 * 2)
            self.stream.width, self.stream.height = self.size
        img = cv2.resize(img, self.size) if (img.shape[1], img.shape[0]) != self.size else img
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
