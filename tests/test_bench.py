"""cign-bench on real exports: statistics by hand, FLOPs against torch's counter, the GEMM peaks, the op
profile, the CLI end to end (torch + onnxruntime, skipped backends with reasons, JSON / markdown / plot,
the profile), without torch, a random-weight preset export, and the GPU split where a GPU is."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from arrays import ArrayReader
from calibration.quantize import quantize_int8
from cign_export.exporter import Exporter, ExportOptions
from cign_export.graph import ExportGraph
from cign_export.preset import export_preset
from cign_runtime import bench
from cign_runtime import manifest as mf
from cign_runtime.backends import open_model
from cign_train.checkpoint import TaskCheckpoint

GPU = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-export") / "task1"
    Exporter(tiny_run, 1, out, ExportOptions(precisions=("fp32", "int8-cpu"), parity_samples=10,
                                             calibration_per_class=2))()
    return out


def test_latency_stats_by_hand():
    s = bench.latency_stats(np.arange(1, 101, dtype=float))  # 1 .. 100 ms
    assert (s["min_ms"], s["max_ms"], s["mean_ms"], s["median_ms"]) == (1, 100, 50.5, 50.5)
    assert s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01)  # numpy's linear rule
    assert s["calls_per_s"] == pytest.approx(1000 / 50.5) and s["iterations"] == 100
    with pytest.raises(ValueError, match="no latencies"):
        bench.latency_stats([])


def test_graph_flops_of_a_hand_built_graph(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32))
    m = helper.make_tensor("m", TensorProto.FLOAT, [32, 7], np.zeros(224, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # (N, 4, 8, 8)
             helper.make_node("Reshape", ["c", "shape"], ["r"]),  # (N, 8, 32)
             helper.make_node("MatMul", ["r", "m"], ["y"])]  # (N, 8, 7)
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], np.array([-1, 8, 32], np.int64))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 7])],
                              initializer=[w, m, shape])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    conv, matmul = 2 * (4 * 8 * 8) * (3 * 3 * 3), 2 * (8 * 7) * 32
    assert bench.graph_flops(path, batch=1) == {"Conv": conv, "MatMul": matmul}
    assert bench.graph_flops(path, batch=3) == {"Conv": 3 * conv, "MatMul": 3 * matmul}


def test_op_profile_times_every_kernel_and_counts_its_flops(tmp_path):
    """onnxruntime's profile of a hand-built Conv + MatMul graph, fp32 and its int8-cpu graph (QLinearConv,
    QLinearMatMul): each part's FLOPs are the graph's, whatever kernels onnxruntime fused them into."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 8, 3, 3], rng.standard_normal(1152).astype(np.float32))
    m = helper.make_tensor("m", TensorProto.FLOAT, [64, 24], rng.standard_normal(1536).astype(np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], np.array([1, 64, 64], np.int64))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # (1, 16, 16, 16)
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"]),  # (1, 64, 64)
             helper.make_node("MatMul", ["f", "m"], ["y"])]  # (1, 64, 24)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 24])], initializer=[w, m, shape])
    fp32 = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), fp32)
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    int8 = quantize_int8(fp32, tmp_path / "g_int8.onnx", ArrayReader("x", [x, -x, 2 * x]), "cpu")
    conv, matmul = 2 * (16 * 16 * 16) * (8 * 3 * 3), 2 * (64 * 24) * 64
    peaks = {"fp32": 100.0, "int8": 400.0}
    for path, kind in ((fp32, "fp32"), (int8, "int8")):
        p = bench.op_profile(path, {"x": x}, calls=3, threads=1, peaks=peaks)
        assert p["by_part"]["conv"]["gflop"] * 1e9 == pytest.approx(conv)
        assert p["by_part"]["matmul"]["gflop"] * 1e9 == pytest.approx(matmul)
        assert sum(v["ms"] for v in p["by_op"].values()) == pytest.approx(p["kernel_ms"])
        assert all(n["ms"] > 0 for n in p["top_nodes"])
        for part in ("conv", "matmul"):
            got = p["by_part"][part]
            assert got["of_peak"] == pytest.approx(got["gflop"] / (got["ms"] / 1e3) / peaks[kind])
        if kind == "int8":
            assert {"QLinearConv", "QLinearMatMul"} <= set(p["by_op"])


def test_graph_flops_of_an_export_agree_with_torch_flop_counter(export):
    """An independent count: torch's FlopCounterMode on the eager graph the ONNX was exported from."""
    manifest = mf.Manifest.load(export)
    ckpt = TaskCheckpoint.load(manifest.checkpoint["path"])
    graph = ExportGraph(ckpt.build_model(), ckpt.spec)
    spec = ckpt.spec
    args = (torch.rand(2, 3, spec.frame_size, spec.frame_size) * 255, torch.randn(2, 1, spec.n_freq, spec.n_time))
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        graph(*args)
    ours = sum(bench.graph_flops(export / "model_fp32.onnx", batch=2).values())
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_gemm_peaks_run_both_kernels():
    fp32, int8 = bench.gemm_peak("fp32", threads=1, n=256, repeats=3), bench.gemm_peak("int8", threads=1, n=256, repeats=3)
    assert fp32 > 1 and int8 > 1  # GFLOP/s; a broken graph raises instead
    with pytest.raises(ValueError, match="fp32 or int8"):
        bench.gemm_peak("bf16")


def test_cli_times_torch_and_onnxruntime_and_lists_what_it_skipped(export, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "cign_export.bench_cli", "--model", str(export), "--backends",
                           "torch-cpu,ort-cpu,ort-cuda,trt", "--precision", "fp32,int8", "--torch-modes", "eager,graph",
                           "--batch", "1,2", "--iterations", "6", "--warmup", "1", "--threads", "1", "--profile", "2",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    got = {(r["backend"], r["precision"], r["batch"]) for r in result["rows"]}
    assert got == {(b, p, n) for b, p in [("torch-cpu", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "int8-cpu")] for n in (1, 2)}
    for r in result["rows"]:
        assert len(r["latencies_ms"]) == 6 and r["min_ms"] <= r["median_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1e3 / r["mean_ms"])
        assert r["floor_ms"] > 0 and r["vs_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        eager = next(e for e in result["rows"] if e["backend"] == "torch-cpu" and e["batch"] == r["batch"])
        assert r["vs_eager"] == pytest.approx(r["median_ms"] / eager["median_ms"])
        assert (r.get("mode"), "setup_s" in r) == (("eager", True) if r["backend"] == "torch-cpu" else (None, False))
    assert result["flops"]["2"] == 2 * result["flops"]["1"]
    skipped = {(s["backend"], s["precision"], s["mode"]): s["reason"] for s in result["skipped"]}
    assert "runs ('fp32', 'fp16', 'bf16'), not int8" in skipped[("torch-cpu", "int8", "eager")]
    assert "captures a CUDA graph: it needs torch-cuda" in skipped[("torch-cpu", "fp32", "graph")]
    if not GPU:
        assert "not available here" in skipped[("ort-cuda", "fp32", None)]
    assert (out / "bench.png").stat().st_size > 1000
    md = (out / "bench.md").read_text()
    assert "| ort-cpu | int8-cpu | 1 |" in md and "| torch-cpu eager | fp32 | 2 |" in md and "Skipped:" in md and bench.environment()["cpu"] in md
    profiled = {(r["backend"], r["precision"], r["batch"]) for r in result["rows"] if "profile" in r}
    assert profiled == {("ort-cpu", p, n) for p in ("fp32", "int8-cpu") for n in (1, 2)}  # not torch
    assert "ort-cpu int8-cpu batch 2: onnxruntime profile, median of 2 calls" in md and "| QLinearConv |" in md


def test_cli_runs_without_torch_and_skips_the_torch_backend(export, tmp_path, torchless_env):
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "cign_export.bench_cli", "--model", str(export), "--backends",
                           "torch-cpu,ort-cpu", "--torch-modes", "eager", "--precision", "fp32", "--batch", "1", "--iterations", "3", "--warmup", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=torchless_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [(r["backend"], r["precision"]) for r in result["rows"]] == [("ort-cpu", "fp32")]
    assert "torch is blocked" in result["skipped"][0]["reason"]


def test_torch_backend_refuses_a_checkpoint_changed_since_the_export(export, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(export, moved)
    manifest = mf.Manifest.load(moved)
    changed = tmp_path / "task_1.pt"
    shutil.copy(manifest.checkpoint["path"], changed)
    with changed.open("ab") as f:
        f.write(b"\0")
    data = json.loads((moved / mf.FILENAME).read_text())
    data["checkpoint"]["path"] = str(changed)
    (moved / mf.FILENAME).write_text(json.dumps(data))
    from cign_export.bench_cli import run_bench

    result = run_bench(moved, {"backends": ["torch-cpu"], "precision": ["fp32"], "torch_modes": ["eager"], "batch": [1],
                               "iterations": 2, "warmup": 0, "threads": 1, "profile": 0})
    assert result["rows"] == [] and "changed since the export" in result["skipped"][0]["reason"]


def test_preset_export_is_a_random_model_the_runtime_and_torch_open(tiny_avdigits, tmp_path):
    manifest = export_preset("cpu", tmp_path / "cpu", classes=7, precisions=("fp32", "int8-cpu"), data_dir=tiny_avdigits)
    assert manifest.n_classes() == 7 and manifest.precisions() == ["fp32", "int8-cpu"]
    frame, spectrogram = (np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32),
                          np.random.default_rng(1).normal(-8, 4, (2, 1, manifest.spec.n_freq, manifest.spec.n_time)).astype(np.float32))
    with open_model(tmp_path / "cpu", "ort-cpu", "fp32") as model:
        got = model.predict(frame, spectrogram)["p_av"]
    ckpt = TaskCheckpoint.load(manifest.checkpoint["path"])
    with torch.inference_mode():
        eager = ExportGraph(ckpt.build_model(), ckpt.spec)(torch.from_numpy(frame), torch.from_numpy(spectrogram))[2]
    assert got.shape == (2, 7)
    np.testing.assert_allclose(got, eager.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not GPU, reason="needs onnxruntime-gpu with a CUDA GPU (none here)")
def test_gpu_split_adds_up_to_about_one_call(export):
    with open_model(export, "ort-cuda", "fp32") as model:
        feeds = {mf.FRAME: np.zeros((1, 3, 64, 64), np.float32),
                 mf.SPECTROGRAM: np.zeros((1, 1, model.spec.n_freq, model.spec.n_time), np.float32)}
        split = model.runner.split_times(feeds)
        assert set(split) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v > 0 for v in split.values())


def test_train_mode_times_both_presets_and_the_loader_beside_them(tiny_avdigits, tmp_path):
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-m", "cign_export.bench_cli", "--train", "--steps", "1", "--threads", "2",
                           "--data-dir", str(tiny_avdigits), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "train.json").read_text())
    steps = {(r["preset"], r["precision"]) for r in result["rows"] if r["what"] == "train step"}
    assert {("cpu", "fp32"), ("paper", "fp32")} <= steps and all(r["samples_per_s"] > 0 for r in result["rows"])
    assert [r["preset"] for r in result["rows"] if r["what"].startswith("loader")] == ["cpu"]  # the tiny store is cpu only
    assert "no prepared store" in result["skipped"][0]["reason"] and result["skipped"][0]["preset"] == "paper"
    assert "cpu: the loader delivers" in proc.stdout


def test_one_mode_at_a_time(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cign_export.bench_cli", "--preset", "cpu", "--train"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give one of --model EXPORT_DIR, --preset cpu|paper or --train" in proc.stderr
