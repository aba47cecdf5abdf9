"""Per-stage latency of the live runtime: a JSONL log per prediction, a summary table and a histogram PNG.

Every stage is in milliseconds. One prediction is timed as (see ``STAGES``):

- ``frame_age`` / ``audio_age``: how old the newest video frame / newest audio sample were when the
  prediction started (capture threads stamp inputs with ``time.perf_counter()``);
- ``preprocess``, ``inference``, ``postprocess``, ``output`` (display / record): stage durations;
- ``end_to_end``: the larger age plus the time from the prediction's start to the end of ``output``,
  i.e. how far the shown answer lags the older of its two newest inputs.

A record is one JSON line: ``t`` (wall clock, s), ``index`` (0-based prediction number), every stage
(ms, rounded to 1 us), ``counts`` (the event counters so far, cumulative) and the caller's extra
fields. If counters changed after the last prediction, ``close()`` adds one counter line
``{"t", "counts"}`` so the file's summary matches the one at exit.

In memory the log keeps stage values as float32 rows (ms to ~1e-7 relative) in fixed 4096-row
chunks, 28 B per prediction: 10^5 predictions take 2.7 MiB (tracemalloc, asserted < 4 MiB in the
tests). Past ``capacity`` rows (default 2^17: 1.8 h at 20 predictions/s, 3.5 MiB) it keeps a uniform
reservoir sample for the percentiles; count, mean and max stay exact.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("frame_age", "audio_age", "preprocess", "inference", "postprocess", "output", "end_to_end")
AGES = ("frame_age", "audio_age")
COUNTERS = ("overflow", "dropped_frame", "stale_frame", "camera_gap", "audio_only")  # always in the summary, 0 when never counted
PERCENTILES = (50, 90, 99)
RESERVED = frozenset(("t", "index", "counts", *STAGES))
CHUNK = 4096  # rows per preallocated block


class Stopwatch:
    """Times one prediction from its construction with ``time.perf_counter()``; every value in ms."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ms: dict[str, float] = {}

    def age(self, name: str, captured_at: float) -> float:
        """Record ``name`` (an age stage) as the ms from ``captured_at`` (a perf_counter stamp) to the start."""
        if name not in AGES:
            raise ValueError(f"{name!r} is not an age stage; ages: {AGES}")
        self.ms[name] = (self.start - captured_at) * 1e3
        return self.ms[name]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as stage ``name`` (added to the stage's time if it runs twice)."""
        if name in AGES or name == "end_to_end" or name not in STAGES:
            raise ValueError(f"{name!r} is not a timed stage; timed: {STAGES[2:-1]}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def finish(self) -> dict[str, float]:
        """Set ``end_to_end`` (the larger age + ms since the start) and return a copy of every stage's ms."""
        ages = [self.ms[a] for a in AGES if a in self.ms]
        self.ms["end_to_end"] = max(ages, default=0.0) + (time.perf_counter() - self.start) * 1e3
        return dict(self.ms)


class LatencyLog:
    """Per-prediction stage latencies to an optional JSONL file (line-buffered) plus bounded in-memory stats.

    ``count()`` may be called from other threads (e.g. an audio callback) and keeps counting after
    ``close()``; ``record()`` after ``close()`` raises.
    """

    def __init__(self, path: str | Path | None = None, capacity: int = 1 << 17, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.path = Path(path) if path is not None else None
        self.capacity = capacity
        self._file = open(self.path, "w", buffering=1, encoding="utf-8") if self.path is not None else None
        self._closed = False
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._written_counts: dict[str, int] = {}
        self._chunks: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)
        self.n = 0  # predictions recorded
        self._sum = np.zeros(len(STAGES))
        self._max = np.full(len(STAGES), -np.inf)
        self.t_first = self.t_last = math.nan

    def count(self, event: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``event`` (e.g. "overflow", "dropped_frame", "stale_frame")."""
        if not event or event in RESERVED:
            raise ValueError(f"bad counter name {event!r}")
        with self._lock:
            self._counts[event] = self._counts.get(event, 0) + n

    @property
    def counts(self) -> dict[str, int]:
        """A snapshot of the event counters."""
        with self._lock:
            return dict(self._counts)

    def record(self, stages: Mapping[str, float], **extra: Any) -> dict[str, Any]:
        """Log one prediction: ``stages`` maps every name in STAGES to ms; ``extra`` adds JSON fields.

        Returns the record exactly as written to the file.
        """
        if self._closed:
            raise ValueError("record() on a closed LatencyLog")
        missing, unknown = [s for s in STAGES if s not in stages], sorted(set(stages) - set(STAGES))
        if missing or unknown:
            raise ValueError(f"stages missing {missing}, unknown {unknown}; expected {STAGES}")
        clash = sorted(RESERVED & set(extra))
        if clash:
            raise ValueError(f"extra fields {clash} clash with the record's own fields")
        row = [round(float(stages[s]), 3) for s in STAGES]
        bad = [s for s, v in zip(STAGES, row) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"non-finite stage values: {bad}")
        rec: dict[str, Any] = {"t": time.time(), "index": self.n, **dict(zip(STAGES, row)), "counts": self.counts,
                               **extra}
        self._write(rec)
        self._keep(np.asarray(row))
        self.t_first = rec["t"] if self.n == 0 else self.t_first
        self.t_last = rec["t"]
        self.n += 1
        return rec

    def _keep(self, row: np.ndarray) -> None:
        """Store ``row`` while under capacity, afterwards replace a random kept row (reservoir sampling)."""
        self._sum += row
        np.maximum(self._max, row, out=self._max)
        if self.n < self.capacity:
            i = self.n
            if i % CHUNK == 0:
                self._chunks.append(np.empty((min(CHUNK, self.capacity - i), len(STAGES)), np.float32))
        else:
            i = int(self._rng.integers(self.n + 1))
            if i >= self.capacity:
                return
        self._chunks[i // CHUNK][i % CHUNK] = row

    def values(self) -> np.ndarray:
        """(kept rows, len(STAGES)) float64 stage values in ms: all predictions, or the reservoir sample."""
        kept = min(self.n, self.capacity)
        if kept == 0:
            return np.empty((0, len(STAGES)))
        return np.concatenate(self._chunks)[:kept].astype(np.float64)

    def _write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, allow_nan=False)
        if self._file is not None:
            self._file.write(line + "\n")
        self._written_counts = rec["counts"]

    def close(self) -> None:
        """Write a counter line if counters changed since the last record, flush and close; idempotent."""
        if self._closed:
            return
        counts = self.counts
        if counts != self._written_counts:
            self._write({"t": time.time(), "counts": counts})
        self._closed = True
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> LatencyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a JSONL latency log: prediction records and a final counter line if any.

    A malformed line raises ValueError naming ``path:line``.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                if set(rec) == {"t", "counts"}:
                    if not isinstance(rec["counts"], dict):
                        raise ValueError("counts is not an object")
                    records.append(rec)
                    continue
                missing = [k for k in ("t", "index", *STAGES) if k not in rec]
                if missing:
                    raise ValueError(f"missing fields {missing}")
                bad = [k for k in ("t", *STAGES) if isinstance(rec[k], bool) or not isinstance(rec[k], (int, float))]
                if bad:
                    raise ValueError(f"non-numeric fields {bad}")
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed latency record: {e}") from None
            records.append(rec)
    return records


def _stats(source: LatencyLog | Iterable[Mapping[str, Any]]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, float,
                                                                        dict[str, int]]:
    """(predictions, kept values (k, S), exact mean (S), exact max (S), wall s, counts) of a log or records."""
    if isinstance(source, LatencyLog):
        n, values, counts = source.n, source.values(), source.counts
        mean = source._sum / n if n else np.full(len(STAGES), np.nan)
        top = source._max if n else np.full(len(STAGES), np.nan)
        wall = source.t_last - source.t_first
    else:
        records = list(source)
        preds = [r for r in records if "index" in r]
        n = len(preds)
        values = np.array([[float(r[s]) for s in STAGES] for r in preds]).reshape(n, len(STAGES))
        mean = values.mean(axis=0) if n else np.full(len(STAGES), np.nan)
        top = values.max(axis=0) if n else np.full(len(STAGES), np.nan)
        wall = preds[-1]["t"] - preds[0]["t"] if n else math.nan
        counts = dict(records[-1].get("counts", {})) if records else {}
    return n, values, mean, top, wall, {**{c: 0 for c in COUNTERS}, **counts}


def summary(source: LatencyLog | Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-stage p50/p90/p99/max/mean (ms), predictions, wall time (s), predictions/s and counters.

    ``wall_s`` spans the first to the last prediction, so predictions/s is (predictions - 1) / wall_s.
    ``sampled`` is how many predictions the percentiles come from (fewer than ``predictions`` only
    for a LatencyLog past its capacity).
    """
    n, values, mean, top, wall, counts = _stats(source)
    pct = np.full((len(PERCENTILES), len(STAGES)), np.nan)
    if len(values):
        pct = np.percentile(values, PERCENTILES, axis=0)
    stages = {s: {**{f"p{p}": float(pct[j, i]) for j, p in enumerate(PERCENTILES)},
                  "max": float(top[i]), "mean": float(mean[i])} for i, s in enumerate(STAGES)}
    rate = (n - 1) / wall if n > 1 and wall > 0 else math.nan
    return {"predictions": n, "sampled": len(values), "wall_s": float(wall), "predictions_per_s": rate,
            "stages": stages, "counts": counts}


def summary_table(source: LatencyLog | Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """A markdown table of ``summary(source)`` (or of a summary dict), then the totals and counters."""
    s = source if isinstance(source, Mapping) and "stages" in source else summary(source)
    cols = [f"p{p}" for p in PERCENTILES] + ["max", "mean"]
    lines = ["| stage | " + " | ".join(f"{c} ms" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(f"{v[c]:.2f}" for c in cols) + " |" for name, v in s["stages"].items()]
    sampled = f" (percentiles from a uniform sample of {s['sampled']})" if s["sampled"] < s["predictions"] else ""
    lines += ["", f"predictions: {s['predictions']}{sampled}", f"wall time: {s['wall_s']:.2f} s",
              f"predictions/s: {s['predictions_per_s']:.2f}"]
    lines += [f"{name}: {v}" for name, v in s["counts"].items()]
    return "\n".join(lines)


def write_histogram(source: LatencyLog | Iterable[Mapping[str, Any]], png_path: str | Path) -> Path:
    """Write one PNG with a latency histogram (ms) per stage, titled with the number of predictions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, values, *_ = _stats(source)
    fig = Figure(figsize=(10, 12), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2).ravel()
    for i, (ax, name) in enumerate(zip(axes, STAGES)):
        ax.hist(values[:, i], bins=50)
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("predictions")
    axes[-1].set_axis_off()
    fig.suptitle(f"latency per stage, {n} predictions" + (f" ({len(values)} sampled)" if len(values) < n else ""))
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=80)
    return png_path


def summarize(path: str | Path, png: str | Path | None = None) -> str:
    """``cign-live --summarize``: the summary table of a log plus a ``histogram:`` line.

    The histogram goes to ``png``, by default the log's path with suffix .png.
    """
    records = read_log(path)
    png = write_histogram(records, Path(path).with_suffix(".png") if png is None else png)
    return summary_table(records) + f"\nhistogram: {png}"
