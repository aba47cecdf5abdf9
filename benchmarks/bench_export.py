"""Export benchmark: export time, file sizes, batch-1 latency per backend and precision, accuracy per precision.

Speed: one CIGN with random weights at each preset's shapes (``cpu``: D 256, depth 1, K 10 at 64 px
+ 32x301; ``paper``: D 512, depth 3, K 100 at 224 px + 257x300), INT8 calibrated on real avdigits
clips prepared at that preset (generated and prepared when missing). Batch-1 latency of PyTorch
eager fp32 vs onnxruntime fp32 / fp16 / INT8 (trt and cpu recipes), each measured in this run
with warm-up; median / p90 / p99 and the ratio to eager. Also the cost of the input normalisation
in the graph against the numpy implementation.

Accuracy: ``cign-export`` of trained avdigits runs (``--run``, one or more, e.g. the default run of
seeds 0-2: ``cign-train --seed S``) with every precision; test-split top-1 per modality per run, and
each precision's audio-visual drop against fp32 as mean and std over the runs.

Writes ``benchmarks/results/export_<cpu|paper>.json`` and ``export_accuracy.json`` and prints tables.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import machine
from calibration.dataset import StoreReader, calibration_indices
from calibration.fp16 import to_fp16
from calibration.quantize import quantize_int8
from cign_export.exporter import Exporter, ExportOptions
from cign_export.graph import ExportGraph, Normalize
from cign_export.onnx_format import export_onnx
from cign_export.preset import calibration_store
from cign_runtime import bench
from cign_runtime import manifest as mf
from cign_runtime import spec as npspec
from cign_runtime.spec import get_preset
from cign_train.checkpoint import last_finished_task
from cign_train.experiments import mean_std
from cign_train.model import CIGN
from cign_train.settings import PRESETS

RESULTS = Path(__file__).parent / "results"
CLASSES = {"cpu": 10, "paper": 100}


def timed(fn, iters: int, warmup: int) -> dict:
    return bench.latency_stats(bench.time_calls(fn, iters, warmup))


def speed(preset: str, data_dir: Path, iters: int, warmup: int, work: Path) -> dict:
    cfg, spec = PRESETS[preset]["model"], get_preset(PRESETS[preset]["spec"])
    torch.manual_seed(0)
    graph = ExportGraph(CIGN(cfg, CLASSES[preset]), spec)
    store = calibration_store(PRESETS[preset]["spec"], data_dir)
    one = store.indices("test")[:1]
    feeds = mf.feed(store.frames(one), store.spectrograms(one))
    paths, export_s = {}, {}

    start = time.perf_counter()
    paths["fp32"] = export_onnx(graph, work / f"{preset}_fp32.onnx")
    export_s["fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    paths["fp16"] = to_fp16(paths["fp32"], work / f"{preset}_fp16.onnx")
    export_s["fp16"] = time.perf_counter() - start
    idx = calibration_indices(store, range(len(store.classes)), per_class=10, seed=0)
    for target in ("trt", "cpu"):
        start = time.perf_counter()
        out = work / f"{preset}_int8-{target}.onnx"
        quantize_int8(paths["fp32"], out, StoreReader(store, idx), target)
        paths[f"int8-{target}"] = out
        export_s[f"int8-{target}"] = time.perf_counter() - start

    rows = []
    tensors = [torch.from_numpy(feeds[mf.FRAME]), torch.from_numpy(feeds[mf.SPECTROGRAM])]
    with torch.inference_mode():
        eager = timed(lambda: graph(*tensors), iters, warmup)
    rows.append({"backend": "torch eager", "precision": "fp32", **eager, "vs_eager": 1.0})
    for precision, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        t = timed(lambda: session.run(None, feeds), iters, warmup)
        rows.append({"backend": "onnxruntime cpu", "precision": precision, **t, "vs_eager": t["median_ms"] / eager["median_ms"],
                     "mb": path.stat().st_size / 1e6, "export_s": export_s[precision]})

    # normalisation: numpy in the runtime vs two ops in the graph (batch 1, raw store rows in)
    frames_u8, log_spec = store.frames(one), store.spectrograms(one)
    numpy_norm = timed(lambda: (npspec.normalize_frames(spec, frames_u8), npspec.normalize_spectrogram(spec, log_spec)),
                       iters, warmup)
    norm_path = work / f"{preset}_normalize.onnx"
    torch.onnx.export(Normalize(spec).eval(), tuple(tensors), str(norm_path), dynamo=True, input_names=[mf.FRAME, mf.SPECTROGRAM],
                      verbose=False)
    norm = ort.InferenceSession(str(norm_path), providers=["CPUExecutionProvider"])
    graph_norm = timed(lambda: norm.run(None, feeds), iters, warmup)
    feed_only = timed(lambda: mf.feed(frames_u8, log_spec), iters, warmup)
    return {"preset": preset, "classes": CLASSES[preset], "rows": rows,
            "normalization": {"numpy_ms": numpy_norm["median_ms"], "in_graph_ms": graph_norm["median_ms"],
                              "feed_layout_ms": feed_only["median_ms"]}}


def accuracy(run: Path, data_dir: Path | None, work: Path) -> dict:
    task = last_finished_task(run)
    if task < 0:
        raise SystemExit(f"{run}: no trained run (train one with cign-train first, or pass --run)")
    options = ExportOptions(precisions=("fp32", "fp16", "int8-trt", "int8-cpu"),
                            data_dir=None if data_dir is None else str(data_dir))
    result = Exporter(run, task, work / "export", options)()
    r = result.report
    return {"run": str(run), "task": task, "test_clips": r["samples"]["test"], "accuracy": r["accuracy"],
            "parity": r["parity"], "confidence": r["confidence"], "steps": r["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="cpu,paper")
    ap.add_argument("--iters", type=int, default=200, help="timed batch-1 runs per configuration (paper: a quarter)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--run", type=Path, nargs="+", default=[Path("runs/avdigits-cign-seed0")],
                    help="trained avdigits runs (their last task is exported)")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    info = machine.describe()
    RESULTS.mkdir(exist_ok=True)
    print(f"CPU: {machine.label(info)}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for preset in args.presets.split(","):
            iters = args.iters if preset == "cpu" else max(20, args.iters // 4)
            result = {"machine": info, "torch_threads": torch.get_num_threads(),
                      **speed(preset, args.data_dir, iters, args.warmup, work)}
            (RESULTS / f"export_{preset}.json").write_text(json.dumps(result, indent=1))
            print(f"\n{preset} preset, K {result['classes']}, batch 1 ({iters} runs)")
            print("| backend | precision | median ms | p99 ms | vs eager | MB | export s |\n|---|---|---|---|---|---|---|")
            for r in result["rows"]:
                print(f"| {r['backend']} | {r['precision']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | {r['vs_eager']:.2f}x | "
                      f"{r.get('mb', float('nan')):.1f} | {r.get('export_s', float('nan')):.1f} |")
            n = result["normalization"]
            print(f"normalisation: numpy {n['numpy_ms']:.3f} ms vs in-graph {n['in_graph_ms']:.3f} ms "
                  f"(layout only, numpy: {n['feed_layout_ms']:.3f} ms)")
        if not args.skip_accuracy:
            runs = [accuracy(run, None, work / f"run{i}") for i, run in enumerate(args.run)]
            print("\naccuracy on the avdigits test split, every precision of each run's last task")
            print("| run | test clips | precision | audio | visual | audio-visual | drop (a-v) |\n|---|---|---|---|---|---|---|")
            for r in runs:
                for p, a in r["accuracy"]["test"].items():
                    d = r["accuracy"]["drop_vs_fp32"].get(p, {}).get("audio_visual", 0.0)
                    print(f"| {r['run']} | {r['test_clips']} | {p} | {a['audio']:.1f} | {a['visual']:.1f} | "
                          f"{a['audio_visual']:.1f} | {d:+.2f} |")
            drops = {p: [r["accuracy"]["drop_vs_fp32"][p]["audio_visual"] for r in runs]
                     for p in runs[0]["accuracy"]["drop_vs_fp32"]}
            summary = {p: dict(zip(("mean", "std"), mean_std(d)), max=max(d)) for p, d in drops.items()}
            print(f"audio-visual drop vs fp32 over {len(runs)} runs, mean +- std (max): " + ", ".join(
                f"{p} {v['mean']:+.2f} +- {v['std']:.2f} ({v['max']:+.2f})" for p, v in summary.items()))
            doc = {"machine": info, "runs": runs, "drop_vs_fp32_audio_visual": summary}
            (RESULTS / "export_accuracy.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
