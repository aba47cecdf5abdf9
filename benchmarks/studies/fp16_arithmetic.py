"""What do float16 layers cost the FP16 and INT8 (TensorRT) graphs when the arithmetic really is float16?

Question: TensorRT 11 builds strongly typed engines: every layer runs in the type its ONNX tensors have.
Does it matter that the FP16 graph keeps its normalisations and reductions (``calibration.fp16.FP32_OPS``)
in float32, and what does the INT8 graph for TensorRT lose when its float layers (outside the Q/DQ pairs)
run in float16 instead of float32?

Answer: the outputs' ops matter most: with every layer float16, 42-90 of a model's 2560 p_av entries fell
to 0 and the mean |diff ln p_av| (what the runtime's confidence reads) was 0.18-0.33; with the Sigmoids and
p_audio * p_visual in float32, 0.003-0.006. Normalisations and reductions in float32 changed little on
these models (0.0029-0.0059 against 0.0032-0.0061, or 0.0041-0.0067 when their sums accumulate in
float16). The INT8 graph for TensorRT with float16 layers agreed with fp32 on 955 of 960 clips (954 with
float32 layers; mean |diff ln p_av| 0.093-0.107 against 0.089-0.103; largest accuracy drop 0.94 point).
onnxruntime's CPU provider hid the float16 effects (0.002-0.003 for every FP16 variant) and, with its
default optimizations, mis-computed the float16 INT8 graph (926 of 960: its WeightBiasQuantization
overflows in float16). Three trained avdigits models, test split; Intel Xeon, 2 cores, AMX.

Method. For each export given (default: the three seeds' exports of ``make bench-enroll``, trained avdigits
models, tokens as input), every clip of its test split goes through the fp32 graph in onnxruntime (the
reference) and through each variant below, both in onnxruntime's CPU provider (what ``cign-export``
checks) and op by op in numpy in each tensor's own type (``calibration.fp16.reference_outputs``: float16
tensors between ops, float32 sums inside Conv / Gemm / MatMul / Einsum, as a GPU computes them).
onnxruntime's CPU provider has float16 kernels for few ops: it runs Conv, MatMul and Gemm in float32 and
drops the Casts between such ops, so its float16 numbers mostly show float16 weights, not float16
arithmetic; its INT8 numbers for the float32 Q/DQ graph are its integer kernels (QLinearConv), for the
float16 Q/DQ graph Q/DQ in float followed by float32 convolutions.

Variants: ``fp16 every layer``: onnxruntime's converter as it is (every float layer float16); ``fp16
outputs' ops fp32``: the ops writing the outputs float32, normalisations and reductions float16; ``fp16``:
the export's FP16 graph (those and ``calibration.fp16.FP32_OPS`` float32); ``int8-trt fp32 layers``: the
Q/DQ graph as onnxruntime's quantizer writes it (what TensorRT 10 runs under ``--int8`` alone);
``int8-trt fp16 layers, outputs' ops fp32``; ``int8-trt``: the export's INT8 graph for TensorRT (float
layers float16 but FP32_OPS and the outputs' ops, Q/DQ scales float16, opset 19). The graphs with float16
normalisations also run with their sums accumulated in float16 (``numpy, float16 sums``: a kernel that sums
in float16; pairwise), and the INT8 graphs in onnxruntime with its WeightBiasQuantization off too
(``calibration.quantize.ORT_DISABLED_OPTIMIZERS``). Per variant and runner: the largest |difference| of each
output from fp32, the top-1 agreement of each output, the mean |ln p_av - ln p_av(fp32)| (ln floored at
1e-12, as the runtime's confidence does), the p_av entries that underflow to 0, and the test top-1 accuracy
per modality. ``--latency`` adds the batch-1 CPU latency of the graphs (random-weight ``cpu`` preset).

Run from the repository root: ``python benchmarks/studies/fp16_arithmetic.py`` (about fifteen minutes per
export on two cores), then ``--latency``. Writes ``benchmarks/studies/results/fp16_arithmetic.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference.ops import load_op
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from calibration import dataset
from calibration.fp16 import FP32_OPS, reference_outputs, to_fp16
from calibration.quantize import ORT_DISABLED_OPTIMIZERS, quantize_int8
from cign_export.parity import accuracy, compare, load_samples, open_store
from cign_runtime import manifest as mf
from cign_runtime.confidence import EPS
from cign_train.checkpoint import TaskCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402

RESULT = Path(__file__).parent / "results" / "fp16_arithmetic.json"
DEFAULT_EXPORTS = [Path(f"runs/bench-enroll/seed{s}/export") for s in range(3)]
OFF = f"onnxruntime cpu, {', '.join(ORT_DISABLED_OPTIMIZERS)} off"
BATCH = 16


def variants(fp32: Path, work: Path, reader) -> dict[str, Path]:
    """The graphs compared, written under ``work``."""
    every_layer = work / "fp16_every_layer.onnx"  # the plain converter: outputs' ops and FP32_OPS in float16 too
    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    OnnxModel(model).topological_sort()
    onnx.save(model, str(every_layer))
    out = {"fp32": fp32, "fp16 every layer": every_layer,
           "fp16 outputs' ops fp32": to_fp16(fp32, work / "fp16_heads.onnx", keep_fp32=()),
           "fp16": to_fp16(fp32, work / "fp16.onnx")}
    for name, keep in (("int8-trt fp32 layers", None), ("int8-trt fp16 layers, outputs' ops fp32", ()),
                       ("int8-trt", FP32_OPS)):
        reader.rewind()
        out[name] = quantize_int8(fp32, work / f"int8_{len(out)}.onnx", reader, "trt", keep_fp32=keep)
    return out


def tree_sum(x: np.ndarray, axes, keepdims: bool) -> np.ndarray:
    """Pairwise sum over ``axes`` with every partial sum rounded to x's type, as a float16 reduction kernel."""
    axes = sorted(a % x.ndim for a in axes)
    kept = [d for i, d in enumerate(x.shape) if i not in axes]
    x = np.moveaxis(x, axes, range(x.ndim - len(axes), x.ndim)).reshape(*kept, -1)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
        x = x[..., 0::2] + x[..., 1::2]
    return np.expand_dims(x[..., 0], axes) if keepdims else x[..., 0]


def float16_sums(op_type: str, run):
    """``op_type`` of onnx.reference, with ``run`` for float16 inputs (sums in float16)."""
    base = load_op("", op_type, 18)

    def _run(self, x, *args, **attributes):
        return (run(x, *args, **attributes),) if x.dtype == np.float16 else base._run(self, x, *args, **attributes)

    return type(op_type, (base,), {"_run": _run})


def _layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=None):
    axes = range(axis % x.ndim, x.ndim)
    n = np.float16(np.prod([x.shape[a] for a in axes]))
    d = x - tree_sum(x, axes, True) / n
    y = d / np.sqrt(tree_sum(d * d, axes, True) / n + np.float16(epsilon)) * scale
    return y if bias is None else y + bias


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / tree_sum(e, [axis], True)


def _reduce(mean: bool):
    def run(x, axes=None, keepdims=1, noop_with_empty_axes=0):
        axes = range(x.ndim) if axes is None or len(axes) == 0 else [int(a) for a in axes]
        s = tree_sum(x, axes, bool(keepdims))
        return s / np.float16(np.prod([x.shape[a] for a in axes])) if mean else s
    return run


#: Normalisations, Softmax and reductions of float16 tensors summing in float16 (a pessimistic kernel).
FLOAT16_SUMS = [float16_sums("LayerNormalization", _layer_norm), float16_sums("Softmax", _softmax),
                float16_sums("ReduceSum", _reduce(False)), float16_sums("ReduceMean", _reduce(True))]


def batched(run, feeds: dict[str, np.ndarray], tokens: np.ndarray) -> dict[str, np.ndarray]:
    n = len(feeds[mf.FRAME])
    parts = [run({**{k: v[i : i + BATCH] for k, v in feeds.items()}, mf.TOKENS: tokens}) for i in range(0, n, BATCH)]
    return {o: np.concatenate([p[o] for p in parts]).astype(np.float32) for o in mf.OUTPUTS}


def onnxruntime_run(path: Path, disabled_optimizers=()):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled_optimizers))
    return lambda feeds: dict(zip(mf.OUTPUTS, session.run(list(mf.OUTPUTS), feeds)))


def scores(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    ln = {k: np.log(np.maximum(d["p_av"].astype(np.float64), EPS)) for k, d in (("got", got), ("ref", ref))}
    return {"outputs": compare(got, ref), "mean_abs_dln_p_av": float(np.mean(np.abs(ln["got"] - ln["ref"]))),
            "p_av_zeros": int(np.sum(got["p_av"] == 0)), "p_av_zeros_fp32": int(np.sum(ref["p_av"] == 0)),
            "non_finite": int(sum((~np.isfinite(v)).sum() for v in got.values())), "accuracy": accuracy(got, labels)}


def measure(export: Path, data_dir: Path | None, control: bool) -> dict:
    manifest = mf.Manifest.load(export)
    ckpt = TaskCheckpoint.load(manifest.checkpoint["path"])
    store = open_store(ckpt.settings, data_dir)
    test = load_samples(store, manifest.classes, "test")
    tokens = np.load(export / manifest.artefact("tokens", task=manifest.task).path)
    calibration = dataset.calibration_indices(store, [store.classes.index(c) for c in manifest.classes], 10, 0)
    reader = dataset.StoreReader(store, calibration, tokens=tokens)
    fp32 = export / manifest.artefact("onnx", "fp32").path
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = variants(fp32, Path(tmp), reader)
        ref = batched(onnxruntime_run(fp32), test.feeds, tokens)
        fp32_accuracy = accuracy(ref, test.labels)
        for name, path in graphs.items():
            runners = {"onnxruntime cpu": onnxruntime_run(path),
                       "numpy, tensor types": lambda f, p=path: reference_outputs(p, f)}
            if name == "fp32":  # the control: numpy against onnxruntime on the same graph
                runners = {"numpy, tensor types": runners["numpy, tensor types"]} if control else {}
            if name.startswith("int8"):
                runners[OFF] = onnxruntime_run(path, ORT_DISABLED_OPTIMIZERS)
            if "outputs' ops fp32" in name:  # the graphs whose normalisations and reductions are float16
                runners["numpy, float16 sums"] = lambda f, p=path: reference_outputs(p, f, FLOAT16_SUMS)
            for runner, run in runners.items():
                start = time.perf_counter()
                got = batched(run, test.feeds, tokens)
                row = {"graph": name, "runner": runner, "seconds": time.perf_counter() - start,
                       **scores(got, ref, test.labels)}
                row["drop_vs_fp32"] = {m: fp32_accuracy[m] - a for m, a in row["accuracy"].items()}
                rows.append(row)
                print(f"{export} {name:40s} {runner:45s} max |diff| "
                      f"{max(v['max_abs_diff'] for v in row['outputs'].values()):.2e}, p_av top-1 "
                      f"{100 * row['outputs']['p_av']['top1_agreement']:.2f} %, dln {row['mean_abs_dln_p_av']:.4f}, "
                      f"AV {row['accuracy']['audio_visual']:.2f} % ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"export": str(export), "classes": manifest.n_classes(), "test_clips": len(test),
            "accuracy_fp32": fp32_accuracy, "rows": rows}


def latency(data_dir: Path, rounds: int, calls: int) -> dict:
    """Batch-1 latency in onnxruntime's CPU provider of the fp32, FP16 and INT8 ``trt`` graphs, before and after
    their float16 layers, for a random-weight CIGN at the ``cpu`` preset (as ``calibration.quantize``'s table),
    on two threads and one: medians of ``rounds`` x ``calls`` calls, the graphs interleaved by round."""
    import torch

    from cign_export.graph import ExportGraph
    from cign_export.onnx_format import export_onnx
    from cign_export.preset import calibration_store
    from cign_runtime import bench
    from cign_runtime.spec import get_preset
    from cign_train.model import CIGN
    from cign_train.settings import PRESETS

    torch.manual_seed(0)
    cfg, spec = PRESETS["cpu"]["model"], get_preset(PRESETS["cpu"]["spec"])
    store = calibration_store(PRESETS["cpu"]["spec"], data_dir)
    one = store.indices("test")[:1]
    feeds = mf.feed(store.frames(one), store.spectrograms(one))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(ExportGraph(CIGN(cfg, 10), spec), Path(tmp) / "fp32.onnx")
        reader = dataset.StoreReader(store, dataset.calibration_indices(store, range(len(store.classes)), 10, 0))
        graphs = {k: v for k, v in variants(fp32, Path(tmp), reader).items() if "outputs' ops" not in k}
        result = {}
        for threads in (2, 1):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            off = {k: list(ORT_DISABLED_OPTIMIZERS) if "int8" in k else [] for k in graphs}
            sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=off[k]) for k, p in graphs.items()}
            times: dict[str, list] = {k: [] for k in sessions}
            for r in range(rounds):
                for k, session in sessions.items():
                    times[k] += list(bench.time_calls(lambda: session.run(None, feeds), calls, 5 if r == 0 else 1))
            result[f"{threads} threads"] = {k: bench.latency_stats(t)["median_ms"] for k, t in times.items()}
            print(threads, "threads:", {k: round(v, 2) for k, v in result[f"{threads} threads"].items()}, flush=True)
    return {"preset": "cpu", "classes": 10, "batch": 1, "rounds": rounds, "calls": calls, "median_ms": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, nargs="+", default=DEFAULT_EXPORTS)
    ap.add_argument("--data-dir", type=Path, help="where the exports' prepared store is [default: their runs']")
    ap.add_argument("--output", type=Path, default=RESULT)
    ap.add_argument("--latency", action="store_true", help="measure the CPU latency part only, into --output's "
                    "\"latency\" (the file is kept otherwise)")
    ap.add_argument("--data-root", type=Path, default=Path("data"), help="--latency: where avdigits is prepared")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)  # the float16 Q/DQ graphs' "can't constant fold" notes, once per session
    if args.latency:
        result = json.loads(args.output.read_text()) if args.output.is_file() else {}
        result["latency"] = {"machine": machine.describe(2), **latency(args.data_root, rounds=6, calls=50)}
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
        return
    missing = [str(e) for e in args.export if not (e / mf.FILENAME).is_file()]
    if missing:
        raise SystemExit(f"no export at {missing}: make bench-enroll writes the default ones, or pass --export DIR")
    result = {"machine": machine.describe(), "split": "test", "fp32_ops": list(FP32_OPS),
              "exports": [measure(e, args.data_dir, control=i == 0) for i, e in enumerate(args.export)]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
