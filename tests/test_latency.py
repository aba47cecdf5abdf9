"""Per-stage latency log: JSONL round trip, percentiles, counters, malformed lines, histogram, stopwatch, memory."""
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cign_runtime.latency import (COUNTERS, STAGES, LatencyLog, Stopwatch, read_log, summarize, summary,
                                  summary_table, write_histogram)



def stages(base: float) -> dict[str, float]:
    """A full stage dict with distinct, known values."""
    return {s: base + i for i, s in enumerate(STAGES)}


def fake_records(values: np.ndarray, dt: float = 0.25, counts: dict | None = None) -> list[dict]:
    """Records as read from a file: one per row of (n, len(STAGES)) ``values``, ``dt`` s apart."""
    return [{"t": 1000.0 + k * dt, "index": k, **dict(zip(STAGES, map(float, row))), "counts": counts or {}}
            for k, row in enumerate(values)]


# ---------------------------------------------------------------------------------- JSONL
def test_records_round_trip_through_jsonl_and_are_line_buffered(tmp_path):
    path = tmp_path / "lat.jsonl"
    with LatencyLog(path) as log:
        written = [log.record(stages(1.23456789)), log.record(stages(40.0), label="dog", confidence=0.93)]
        assert len(path.read_text().splitlines()) == 2  # on disk before close: a crash loses nothing
        written.append(log.record(stages(7.5)))
    assert read_log(path) == written
    assert [r["index"] for r in written] == [0, 1, 2]
    assert written[0]["frame_age"] == 1.235 and written[1]["label"] == "dog"  # ms rounded to 1 us
    assert all(abs(r["t"] - time.time()) < 60 for r in written)
    with pytest.raises(ValueError, match="closed"):
        log.record(stages(1.0))
    assert len(path.read_text().splitlines()) == 3


def test_record_refuses_missing_unknown_clashing_and_nonfinite(tmp_path):
    log = LatencyLog()
    with pytest.raises(ValueError, match=r"missing \['end_to_end'\]"):
        log.record({s: 1.0 for s in STAGES[:-1]})
    with pytest.raises(ValueError, match=r"unknown \['inferense'\]"):
        log.record({**stages(1.0), "inferense": 2.0})
    with pytest.raises(ValueError, match="clash"):
        log.record(stages(1.0), index=5)
    with pytest.raises(ValueError, match="non-finite"):
        log.record({**stages(1.0), "inference": float("nan")})
    assert log.n == 0


def test_context_manager_closes_on_error(tmp_path):
    with pytest.raises(RuntimeError), LatencyLog(tmp_path / "lat.jsonl") as log:
        log.record(stages(1.0))
        raise RuntimeError("pipeline failed")
    assert log._file.closed and len(read_log(tmp_path / "lat.jsonl")) == 1


# ---------------------------------------------------------------------------------- summary
def test_percentiles_hand_checked():
    values = np.tile(np.arange(1.0, 11.0)[:, None], (1, len(STAGES)))  # 1..10 ms in every stage
    s = summary(fake_records(values))
    # linear interpolation between order statistics: p90 = 9 + 0.1 * (10 - 9), p99 = 9 + 0.91 * (10 - 9)
    assert s["stages"]["inference"] == pytest.approx({"p50": 5.5, "p90": 9.1, "p99": 9.91, "max": 10.0, "mean": 5.5})
    assert s["predictions"] == 10 and s["wall_s"] == pytest.approx(2.25)
    assert s["predictions_per_s"] == pytest.approx(4.0)  # 9 intervals of 0.25 s


def test_percentiles_match_numpy_for_records_and_log():
    rng = np.random.default_rng(1)
    values = np.round(rng.gamma(2.0, 10.0, size=(500, len(STAGES))), 3)
    log = LatencyLog()
    for row in values:
        log.record(dict(zip(STAGES, row)))
    for s in (summary(fake_records(values)), summary(log)):
        for i, name in enumerate(STAGES):
            got = s["stages"][name]
            want = np.percentile(values[:, i], [50, 90, 99])
            assert [got["p50"], got["p90"], got["p99"]] == pytest.approx(want, rel=1e-6)
            assert got["max"] == pytest.approx(values[:, i].max(), rel=1e-6)
            assert got["mean"] == pytest.approx(values[:, i].mean(), rel=1e-6)


def test_counters_reach_the_summary_the_table_and_the_file(tmp_path):
    path = tmp_path / "lat.jsonl"
    with LatencyLog(path) as log:
        log.count("overflow")
        log.record(stages(1.0))
        log.count("overflow", 2)
        log.count("dropped_frame")
        log.count("model_reload")
        log.record(stages(2.0))
    want = {"overflow": 3, "dropped_frame": 1, "stale_frame": 0, "camera_gap": 0, "audio_only": 0, "model_reload": 1}
    assert summary(log)["counts"] == want
    assert summary(read_log(path))["counts"] == want  # cumulative counts in each record; the last one wins
    assert len(read_log(path)) == 2  # no counter line: nothing was counted after the last prediction
    table = summary_table(log)
    for name, n in want.items():
        assert f"\n{name}: {n}" in table
    assert set(COUNTERS) <= set(summary(LatencyLog())["counts"])


def test_summary_table_lists_every_stage():
    table = summary_table(fake_records(np.full((3, len(STAGES)), 12.345)))
    lines = table.splitlines()
    assert lines[0] == "| stage | p50 ms | p90 ms | p99 ms | max ms | mean ms |"
    assert [ln.split(" | ")[0].lstrip("| ") for ln in lines[2:2 + len(STAGES)]] == list(STAGES)
    assert "| inference | 12.35 | 12.35 | 12.35 | 12.35 | 12.35 |" in lines and "predictions: 3" in lines


def test_capacity_keeps_a_sample_with_exact_count_mean_and_max():
    rng = np.random.default_rng(2)  # latencies drift from 0 to 100 ms: the first or last 1000 would be biased
    values = np.linspace(0.0, 100.0, 20_000)[:, None] + rng.uniform(0.0, 1.0, size=(20_000, len(STAGES)))
    log = LatencyLog(capacity=1000)
    for row in values:
        log.record(dict(zip(STAGES, row)))
    s = summary(log)
    assert s["predictions"] == 20_000 and s["sampled"] == 1000 and log.values().shape == (1000, len(STAGES))
    assert s["stages"]["inference"]["max"] == pytest.approx(np.round(values[:, 3], 3).max(), rel=1e-6)
    assert s["stages"]["inference"]["mean"] == pytest.approx(np.round(values[:, 3], 3).mean(), rel=1e-9)
    assert s["stages"]["inference"]["p50"] == pytest.approx(50.5, abs=6.0)
    assert "uniform sample of 1000" in summary_table(s)


def test_counts_without_predictions_survive_to_the_file(tmp_path):
    path = tmp_path / "lat.jsonl"
    with LatencyLog(path) as log:
        log.count("overflow", 4)
    s = summary(read_log(path))
    assert s["predictions"] == 0 and s["counts"]["overflow"] == 4 and np.isnan(s["stages"]["inference"]["p50"])
    assert "overflow: 4" in summarize(path)


# ---------------------------------------------------------------------------------- files
def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "lat.jsonl"
    good = json.dumps(fake_records(np.ones((1, len(STAGES))))[0])
    path.write_text(good + "\n" + good + "\n" + '{"t": 1.0, "index": 2, "frame_age": 3\n')
    with pytest.raises(ValueError, match=rf"{path}:3: malformed"):
        read_log(path)
    missing = {k: v for k, v in json.loads(good).items() if k != "inference"}
    path.write_text(good + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: .*missing fields \['inference'\]"):
        read_log(path)
    path.write_text(good + "\n\n" + good + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2:"):
        read_log(path)


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert matplotlib.image.imread(path).shape[:2] == (960, 800)  # 10 x 12 in at 80 dpi


def test_histogram_is_a_real_png(tmp_path):
    rng = np.random.default_rng(3)
    png = write_histogram(fake_records(rng.gamma(2.0, 5.0, size=(200, len(STAGES)))), tmp_path / "h.png")
    assert_png(png)
    assert_png(write_histogram([], tmp_path / "empty.png"))


def test_summarize_prints_the_table_and_writes_png_next_to_log(tmp_path):
    path = tmp_path / "run.jsonl"
    with LatencyLog(path) as log:
        for k in range(20):
            sw = Stopwatch()
            sw.age("frame_age", sw.start - 0.010)
            sw.age("audio_age", sw.start - 0.005)
            for name in ("preprocess", "inference", "postprocess", "output"):
                with sw.stage(name):
                    pass
            log.record(sw.finish(), label=k % 3)
        log.count("stale_frame")
    text = summarize(path)
    assert text == summary_table(read_log(path)) + f"\nhistogram: {tmp_path / 'run.png'}"
    assert "stale_frame: 1" in text and "predictions: 20" in text
    last = read_log(path)[-1]
    assert set(last) == {"t", "counts"} and last["counts"] == {"stale_frame": 1}  # counted after the last prediction
    assert_png(tmp_path / "run.png")
    summarize(path, png=tmp_path / "other.png")
    assert_png(tmp_path / "other.png")


# ---------------------------------------------------------------------------------- stopwatch
def test_stopwatch_measures_stages_ages_and_end_to_end():
    sw = Stopwatch()
    assert sw.age("frame_age", sw.start - 0.5) == pytest.approx(500.0)
    sw.age("audio_age", sw.start - 0.1)
    with sw.stage("inference"):
        time.sleep(0.02)
    assert 20.0 <= sw.ms["inference"] < 40.0
    ms = sw.finish()
    assert 520.0 <= ms["end_to_end"] < 600.0  # the older input's age + time since the start
    with pytest.raises(ValueError, match="not a timed stage"):
        with sw.stage("inferense"):
            pass
    with pytest.raises(ValueError, match="not an age stage"):
        sw.age("inference", 0.0)


# ---------------------------------------------------------------------------------- cost
def test_memory_per_record_is_bounded():
    row = stages(10.0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        log = LatencyLog()
        for _ in range(100_000):
            log.record(row, label=3)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert log.n == 100_000 and used < 4 * 2**20, f"{used / 2**20:.2f} MiB for 1e5 records"


def test_module_imports_without_torch_or_matplotlib(tmp_path, torchless_env):
    code = """
import sys
import cign_runtime.latency as lat
assert "matplotlib" not in sys.modules, "matplotlib imported eagerly"
try:
    import torch
except ImportError as e:
    assert "blocked" in str(e), e
else:
    raise SystemExit("the fake torch was not first on the path")
log = lat.LatencyLog()
log.record(lat.Stopwatch().finish() | {"frame_age": 1.0, "audio_age": 1.0, "preprocess": 1.0, "inference": 1.0,
                                        "postprocess": 1.0, "output": 1.0})
print(lat.summary(log)["predictions"])
"""
    done = subprocess.run([sys.executable, "-c", code], env=torchless_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]
