"""Model latency measurement for ``cign-bench`` (torch-free): timing, percentiles, the hardware floor.

- ``latency_stats``: min / median / mean / p90 / p95 / p99 / max of per-call latencies and the
  throughput they imply, as MLPerf's single-stream scenario reports them (p90 is its headline).
- ``time_calls``: warm-up calls, then timed calls, one ``perf_counter`` pair each.
- ``graph_flops``: the multiply-adds of an ONNX graph's Conv / ConvTranspose / MatMul / Gemm /
  Einsum nodes at a given batch (x2 = FLOPs), from ONNX shape inference; element-wise ops,
  normalisation and softmax are left out (under 1 % of CIGN's count).
- ``gemm_peak``: this machine's matrix-multiply rate through onnxruntime's CPU kernels (MLAS, the
  ones the exported graph runs): an fp32 ``MatMul`` and a u8 x s8 ``MatMulInteger`` (the integer
  kernel VNNI speeds up) of square matrices, best of several runs. ``floor = FLOPs / peak`` is
  the latency a graph would have if every FLOP ran at that rate.
- ``op_profile``: where one call's time goes, from onnxruntime's own profiler (the kernels it runs
  after its fusions): per part (convolutions, matrix products, everything else), per op type and
  per node, each kernel's FLOPs from the shapes the profiler records and its rate against the
  peak of its arithmetic (int8 kernels against the int8 peak), as trtexec's per-layer profile.
- ``environment``: CPU model and ISA flags, cores, threads, GPU and driver, library versions.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from cign_runtime import isa
from cign_runtime import manifest as mf

#: ISA flags that decide fp32 / bf16 / int8 speed on x86 (``/proc/cpuinfo`` names).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: Percentiles reported besides min, median, mean and max.
PERCENTILES = (90, 95, 99)


def latency_stats(ms) -> dict[str, float]:
    """Per-call latencies (ms) -> {min, median, mean, p90, p95, p99, max} ms and calls / s."""
    t = np.asarray(ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no latencies to summarise")
    stats = {"min_ms": float(t.min()), "median_ms": float(np.median(t)), "mean_ms": float(t.mean())}
    stats |= {f"p{p}_ms": float(np.percentile(t, p)) for p in PERCENTILES}
    stats |= {"max_ms": float(t.max()), "calls_per_s": float(1e3 / t.mean()), "iterations": int(t.size)}
    return stats


def time_calls(fn: Callable[[], object], iterations: int, warmup: int,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Run ``fn`` ``warmup`` times untimed, then ``iterations`` times; the latencies in ms."""
    for _ in range(warmup):
        fn()
    out = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - start) * 1e3
        if progress is not None:
            progress(1)
    return out


def _dims(info) -> list[int] | None:
    shape = info.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def graph_flops(onnx_path: str | os.PathLike, batch: int = 1, tokens: int | None = None) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) per op type of one call at ``batch``; ``tokens``: K of a tokens-as-input graph.

    Every symbolic input dim is fixed (the first to ``batch``, the token table's rows to ``tokens``)
    and ONNX shape inference gives each node's shapes; a node whose shapes stay unknown raises.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for j, d in enumerate(dims):
            if not d.HasField("dim_value"):
                if j == 0 and inp.name != mf.TOKENS:
                    d.dim_value = batch
                elif tokens is not None and j == 0:
                    d.dim_value = tokens
                else:
                    raise ValueError(f"{onnx_path}: input {inp.name} has a symbolic dim {d.dim_param!r} to fix")
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    shapes |= {i.name: list(i.dims) for i in model.graph.initializer}
    flops: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MatMulInteger", "ConvInteger"):
            continue
        ins, out = [shapes.get(n) for n in node.input], shapes.get(node.output[0])
        if out is None or ins[0] is None or ins[1] is None:
            raise ValueError(f"{onnx_path}: no static shapes for {node.op_type} node {node.name!r}")
        if node.op_type in ("Conv", "ConvInteger"):
            w = ins[1]  # (Cout, Cin / groups, kh, kw)
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            w = ins[1]  # (Cin, Cout / groups, kh, kw)
            macs = int(np.prod(ins[0])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs = int(np.prod(out)) * ins[0][0 if trans_a else 1]
        elif node.op_type == "Einsum":
            eq = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
            lhs, _ = eq.split("->")
            sizes = {}
            for term, shape in zip(lhs.split(","), ins):
                sizes.update(zip(term, shape))
            macs = int(np.prod(list(sizes.values())))  # every index of the product is iterated once
        else:  # MatMul, MatMulInteger: (..., M, K) @ (..., K, N)
            macs = int(np.prod(out)) * ins[0][-1]
        flops[node.op_type] = flops.get(node.op_type, 0) + 2 * macs
    return flops


def _gemm_model(kind: str, n: int):
    from onnx import TensorProto, helper

    if kind == "fp32":
        ta = tb = TensorProto.FLOAT
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        tc = TensorProto.FLOAT
    else:
        ta, tb, tc = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
        node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
    graph = helper.make_graph([node], f"gemm_{kind}", [helper.make_tensor_value_info("a", ta, [n, n]),
                                                      helper.make_tensor_value_info("b", tb, [n, n])],
                              [helper.make_tensor_value_info("c", tc, [n, n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def gemm_peak(kind: str = "fp32", threads: int | None = None, n: int = 1024, repeats: int = 7) -> float:
    """GFLOP/s of onnxruntime's CPU matrix multiply (``fp32`` MatMul or ``int8`` u8 x s8 MatMulInteger)
    on (n, n) x (n, n), the best of ``repeats`` runs after one warm-up."""
    if kind not in ("fp32", "int8"):
        raise ValueError(f"gemm kind {kind!r}: fp32 or int8")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(_gemm_model(kind, n), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if kind == "fp32":
        feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    else:
        feeds = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8), "b": rng.integers(-128, 128, (n, n), dtype=np.int8)}
    best = time_calls(lambda: session.run(None, feeds), repeats, warmup=1).min()
    return 2 * n**3 / (best * 1e-3) / 1e9


#: onnxruntime CPU kernels (after graph fusion) that convolve: the weight's input index.
CONV_KERNELS = {"Conv": 1, "FusedConv": 1, "NhwcConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
#: ... that multiply matrices (A is input 0; Gemm's transA is 0 in torch exports).
MATMUL_KERNELS = frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "QLinearMatMul", "QGemm", "MatMulInteger",
                            "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})


def kernel_flops(op: str, a_shape: list[int], out_shape: list[int], weight_shape: list[int] | None) -> int:
    """2 x multiply-adds of one kernel run (0 for kernels that neither convolve nor multiply matrices).

    Convolutions: output elements x (Cin / groups x kh x kw) of the weight (Cout, Cin / groups, kh, kw),
    the layout onnxruntime keeps in NCHW, NHWC and NCHWc kernels; matrix products: output elements x
    the inner dimension, A's last.
    """
    if op in CONV_KERNELS:
        if weight_shape is None:
            raise ValueError(f"{op}: no weight shape (the weight is not an initializer of the optimized graph)")
        return 2 * int(np.prod(out_shape)) * int(np.prod(weight_shape[1:]))
    if op in MATMUL_KERNELS:
        return 2 * int(np.prod(out_shape)) * int(a_shape[-1])
    return 0


def _part(op: str) -> str:
    return "conv" if op in CONV_KERNELS else "matmul" if op in MATMUL_KERNELS else "other"


def _integer(op: str) -> bool:
    return op.startswith("QLinear") or op in ("QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                                            "DynamicQuantizeMatMul")


def op_profile(onnx_path: str | os.PathLike, feeds: dict[str, np.ndarray], calls: int, threads: int | None,
               peaks: dict[str, float], top: int = 15) -> dict:
    """Per-kernel time of ``calls`` profiled calls (median per node, ms per call) of the graph on onnxruntime's
    CPU provider, grouped into parts and op types, with FLOPs and the rate against ``peaks`` (GFLOP/s by kind):
    ``of_peak`` = floor / time, the floor being each kernel's FLOPs at the peak of its arithmetic."""
    import onnx

    per_node: dict[str, list[float]] = {}
    info: dict[str, tuple[str, list, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")  # the graph the profile names
        options.log_severity_level = 3  # not the warning that this optimized graph is specific to this CPU
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # the first call allocates; it is profiled too, and left out below
        for _ in range(calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    weights = {n.name: dims.get(n.input[CONV_KERNELS[n.op_type]]) for n in graph.node if n.op_type in CONV_KERNELS}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        args = e["args"]
        a_shape, out_shape = (list(args[k][0].values())[0] if args.get(k) else [] for k in ("input_type_shape",
                                                                                           "output_type_shape"))
        info[e["name"]] = (args["op_name"], a_shape, out_shape)
        per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)
    nodes = []
    for name, ms in per_node.items():
        op, a_shape, out_shape = info[name]
        node = name.removesuffix("_kernel_time")
        flops = kernel_flops(op, a_shape, out_shape, weights.get(node))
        nodes.append({"node": node, "op": op, "ms": float(np.median(ms[-calls:])), "gflop": flops / 1e9,
                      "kind": "int8" if _integer(op) else "fp32"})
    total = sum(n["ms"] for n in nodes)

    def rate(group: list[dict]) -> dict:
        """Time, FLOPs and rate of ``group``; its floor: each kernel's FLOPs at the peak of its own arithmetic."""
        ms, gflop = sum(n["ms"] for n in group), sum(n["gflop"] for n in group)
        out = {"ms": ms, "share": ms / total if total else 0.0, "nodes": len(group), "gflop": gflop}
        if gflop:
            out["gops"] = gflop / (ms / 1e3)
            out["floor_ms"] = sum(n["gflop"] / peaks[n["kind"]] for n in group) * 1e3
            out["of_peak"] = out["floor_ms"] / ms
        return out

    by_part = {p: rate([n for n in nodes if _part(n["op"]) == p]) for p in ("conv", "matmul", "other")}
    ops = sorted({n["op"] for n in nodes}, key=lambda o: -sum(n["ms"] for n in nodes if n["op"] == o))
    for n in nodes:
        if n["gflop"]:
            n["gops"] = n["gflop"] / (n["ms"] / 1e3)
            n["of_peak"] = n["gops"] / peaks[n["kind"]]
    return {"calls": calls, "kernel_ms": total, "by_part": by_part,
            "by_op": {o: rate([n for n in nodes if n["op"] == o]) for o in ops},
            "top_nodes": sorted(nodes, key=lambda n: -n["ms"])[:top]}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu() -> dict | None:
    """Name, driver and memory of the first NVIDIA GPU (``nvidia-smi``), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (subprocess.SubprocessError, OSError):
        return None
    if not out:
        return None
    name, driver, memory = (x.strip() for x in out[0].split(","))
    return {"name": name, "driver": driver, "memory": memory, "count": len(out)}


def environment(threads: int | None = None) -> dict:
    """What a latency depends on besides the model: CPU and the flags its kernels may use (without the
    masked ones under ``cign_runtime.isa``), the instruction set, cores, threads, GPU, library versions."""
    model = isa.cpuinfo().get("model name") or platform.processor() or "unknown"
    flags = isa.cpu_flags()
    return {"cpu": model, "flags": [f for f in CPU_FLAGS if f in flags], "cpu_isa": isa.current(), "cores": os.cpu_count(),
            "threads": threads, "platform": platform.platform(), "gpu": gpu(),
            "versions": {p: _version(p) for p in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch",
                                                   "tensorrt", "cuda-python")}}


def cpu_label(env: dict) -> str:
    """'CPU model (N cores; flags)' for tables, with the instruction set when it is masked."""
    masked = f", CPUID-masked to {env['cpu_isa']}" if env.get("cpu_isa", "native") != "native" else ""
    return f"{env['cpu']} ({env['cores']} cores; {' '.join(env['flags']) or 'no AVX2'}{masked})"
