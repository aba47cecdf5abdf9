"""The AVX2 instruction-set mask (cign_runtime.isa) on this machine's real libraries: numpy, torch and
onnxruntime pick their AVX2 kernels under it, the environment reports it, cign-bench runs under it, the
int8-cpu recipe keeps its accuracy on the AVX2 kernels (whose u8 x s8 products saturate), and the
runtime does not run an older 8-bit-weight int8-cpu graph there."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from arrays import ArrayReader
from calibration.quantize import quantize_int8
from cign_runtime import isa
from cign_runtime.backends import VNNI_FLAGS

REASON = isa.unavailable("avx2")
HOST_AVX512 = "avx512f" in isa.cpu_flags()
#: This CPU's own kernels are the AVX2 ones (no AVX-512, VNNI or AMX): nothing to mask.
HOST_AVX2_ONLY = "avx2" in isa.cpu_flags() and not isa.cpu_flags() & isa.MASKED_FLAGS
needs_mask = pytest.mark.skipif(REASON is not None or not HOST_AVX512,
                                reason=f"the AVX2 mask cannot run or hides nothing here: {REASON or 'no AVX-512 on this CPU'}")


def avx2_kernels() -> dict[str, str]:
    """The environment of a process whose libraries run AVX2 kernels: this one's on an AVX2-only CPU, else masked."""
    return isa.environ("native") if HOST_AVX2_ONLY else isa.environ("avx2")

PROBE = """
import json, numpy as np, torch
from cign_runtime import bench
from cign_train.precision import cpu_has_native_bf16
env = bench.environment()
print(json.dumps({"numpy_avx512f": bool(np._core._multiarray_umath.__cpu_features__["AVX512F"]),
                  "torch": torch.backends.cpu.get_cpu_capability(), "flags": env["flags"], "cpu_isa": env["cpu_isa"],
                  "bf16": cpu_has_native_bf16()}))
"""


def probe(cpu_isa: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env=isa.environ(cpu_isa))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_mask
def test_the_mask_hides_avx512_from_numpy_torch_and_the_reported_environment(tmp_path):
    native, masked = probe("native"), probe("avx2")
    assert native["numpy_avx512f"] and native["torch"].startswith("AVX512") and native["cpu_isa"] == "native"
    assert "avx512f" in native["flags"]
    assert masked["numpy_avx512f"] is False and masked["torch"] == "AVX2" and masked["cpu_isa"] == "avx2"
    assert masked["flags"] == ["avx2"] and masked["bf16"] is False  # --amp auto then trains in fp32


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="choose from"):
        isa.unavailable("avx10")


SCORE = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
outs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in sys.argv[2:]]
np.save(sys.argv[1] + ".out.npy", np.stack(outs))
"""


@pytest.mark.skipif(not HOST_AVX2_ONLY and REASON is not None, reason=f"no AVX2 kernels to run here: {REASON}")
def test_int8_cpu_graph_keeps_its_accuracy_on_avx2_kernels(tmp_path):
    """A convolution whose u8 inputs and s8 weights are large: on AVX2 onnxruntime sums pairs of u8 x s8
    products in saturating 16 bits (vpmaddubsw); with 8-bit weights (255 x 127 x 2 > 32767) the outputs
    were clipped, the cpu recipe's 7-bit weights keep every pair in range."""
    rng = np.random.default_rng(0)
    w = np.where(rng.random((8, 32, 3, 3)) < 0.9, 1.0, -1.0).astype(np.float32)  # one magnitude: all at the int8 edge
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [numpy_helper.from_array(w, "w")])
    fp32 = tmp_path / "conv_fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    x = rng.uniform(0.5, 4.0, (1, 32, 6, 6)).astype(np.float32)  # large positive activations, as after a ReLU
    calib = [rng.uniform(0.0, 4.0, (1, 32, 6, 6)).astype(np.float32) for _ in range(8)]
    int8 = quantize_int8(fp32, tmp_path / "conv_int8.onnx", ArrayReader("x", calib), "cpu")
    np.save(tmp_path / "x.npy", x)
    for cpu_isa, env in (("native", isa.environ("native")), ("avx2", avx2_kernels())):
        proc = subprocess.run([sys.executable, "-c", SCORE, str(tmp_path / "x.npy"), str(fp32), str(int8)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref, got = np.load(tmp_path / "x.npy.out.npy")
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 0.05, f"{cpu_isa}: int8 output off by {rel:.1%} of the fp32 range"  # 8-bit weights: 20 % on avx2


@needs_mask
def test_bench_runs_under_the_mask_and_says_so(tiny_run, tmp_path):
    from cign_export.exporter import Exporter, ExportOptions

    export = tmp_path / "export"
    Exporter(tiny_run, 1, export, ExportOptions(precisions=("fp32",), parity_samples=4, calibration_per_class=2))()
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "cign_export.bench_cli", "--model", str(export), "--backends",
                           "ort-cpu", "--precision", "fp32", "--batch", "1", "--iterations", "3", "--warmup", "0",
                           "--cpu-isa", "avx2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = json.loads((out / "bench.json").read_text())["environment"]
    assert env["cpu_isa"] == "avx2" and env["flags"] == ["avx2"]
    assert "CPUID-masked to avx2" in (out / "bench.md").read_text()


OPEN = """
import sys
from cign_runtime.backends import open_model
try:
    model = open_model(sys.argv[1], "ort-cpu", None if sys.argv[2] == "default" else sys.argv[2])
except ValueError as e:
    print("refused:", e)
else:
    print(model.precision, "|", model.reason)
"""


def opened(export, precision: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", OPEN, str(export), precision], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not HOST_AVX2_ONLY and REASON is not None, reason=f"no AVX2 kernels to run here: {REASON}")
def test_runtime_runs_an_8_bit_int8_graph_in_fp32_on_avx2_kernels(tiny_run, tmp_path):
    """An export whose int8-cpu graph has 8-bit weights (the recipe before 2026-11-27): on AVX2 kernels the
    runtime picks fp32 by default and says why, and refuses int8-cpu when asked; the 7-bit graph runs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from calibration.dataset import StoreReader
    from cign_export.exporter import Exporter, ExportOptions
    from cign_runtime import manifest as mf
    from cign_train.data.store import PreparedStore

    export = tmp_path / "export"
    Exporter(tiny_run, 1, export, ExportOptions(precisions=("fp32", "int8-cpu"), parity_samples=4,
                                                calibration_per_class=2))()
    assert opened(export, "default", avx2_kernels()).startswith("int8-cpu |")  # 7 bits: runs everywhere
    manifest = mf.Manifest.load(export)
    store = PreparedStore(json.loads((export / "report.json").read_text())["samples"]["store"])
    old = export / "model_int8-cpu.onnx"
    quantize_static(str(export / "model_fp32.onnx"), str(old), StoreReader(store, np.arange(8)),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "Gemm", "MatMul", "Relu"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})  # the earlier recipe: full 8-bit weights
    artefacts = [mf.Artefact.of(export, old, "onnx", precision="int8-cpu") if a.precision == "int8-cpu" else a
                 for a in manifest.artefacts]
    dataclasses.replace(manifest, artefacts=artefacts).save(export)

    default = opened(export, "default", avx2_kernels())
    assert default.startswith("fp32 |") and "fp32, not int8-cpu" in default and "8 bits" in default
    asked = opened(export, "int8-cpu", avx2_kernels())
    assert asked.startswith("refused:") and "export it again" in asked
    if isa.cpu_flags() & VNNI_FLAGS:  # VNNI accumulates in int32: it runs
        assert opened(export, "default", isa.environ("native")).startswith("int8-cpu |")
