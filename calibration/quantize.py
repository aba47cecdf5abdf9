"""INT8 graphs from the fp32 export: static post-training quantization with onnxruntime.

Two recipes, one per consumer (``cign_runtime.manifest.PRECISIONS`` "int8-trt", "int8-cpu"), both
QDQ with int8 weights quantized per output channel (symmetric), MinMax ranges from the
class-balanced calibration set (``calibration.dataset``), and the same quantized ops (OP_TYPES):

- ``trt``: int8 activations, symmetric, so every zero point is 0 as TensorRT requires; weights in
  [-127, 127]; biases stay float (TensorRT dequantizes INT8 / FP8 only, not int32 biases); the
  QuantizeLinear / DequantizeLinear ops stay in the default ONNX domain and the result is checked
  against TensorRT 10's operator list (``cign_runtime.trt_ops``).
- ``cpu``: uint8 activations (asymmetric), the activation type onnxruntime's x86 integer kernels
  run fastest (below); onnxruntime fuses the Q/DQ pairs into QLinearConv / integer MatMul kernels.
  Weights take 7 bits ([-64, 64], onnxruntime's ``reduce_range``) so that the graph keeps its
  accuracy on CPUs without VNNI (below). The attention products between two activations (Q K^T and
  the softmax times V, :func:`activation_matmuls`) stay float: quantized, their softmax becomes
  onnxruntime's QLinearSoftmax, 3.5x the float Softmax's time at the paper shapes. Leaving them
  float made the paper-preset graph 0.95x as long on this CPU and 0.98x on the AVX2 kernels (batch
  1, 2 threads, 60 interleaved calls each) and agreed with fp32 as well (99.68 % / Δ .072 against
  99.64 % / .083 with them quantized, on the 2,200 clips of the table below: one checkpoint, a
  difference of one clip, not a claimed gain). The choice rests on speed; the 7-bit weights on
  the saturation arithmetic, not on these agreement figures.

Latency (onnxruntime 1.32 CPU provider, batch 1, medians of 300 interleaved runs per graph; this
machine: "Intel(R) Xeon(R) Processor" under KVM, family 6 model 167, 2 vCPUs, AVX-512 VNNI,
AVX512-BF16, AMX-INT8; random-weight CIGN exported with ``export_onnx``):

=================================== ========= ========= ========= =========
graph                               fp32      int8-trt  int8-cpu  fp16
=================================== ========= ========= ========= =========
cpu preset (D 256, depth 1), 2 thr  8.8 ms    13.1 ms   3.5 ms    10.3 ms
cpu preset, 1 thread                16.5 ms   15.5 ms   4.6 ms    17.7 ms
paper preset (D 512, depth 3,       46.5 ms   53.6 ms   19.0 ms   51.0 ms
224 px, 257 x 300), 2 thr, 32 runs
=================================== ========= ========= ========= =========

int8-cpu is 2.5x (3.6x on one thread, 2.4x at paper size) faster than fp32; the symmetric int8
activations TensorRT needs run 1.5x slower than fp32 on two threads and 6 % faster on one with
onnxruntime's x86 kernels, hence a separate CPU graph. Among u8 recipes, per-tensor QDQ ran as
fast (3.5 ms) and QOperator slower (4.1 ms per channel and per tensor), so the CPU recipe is QDQ
per channel, the more accurate.

Accuracy against the fp32 graph, for a CIGN trained by the default ``cign-train`` run (avdigits,
cpu preset, 5 tasks; task_4.pt, 10 classes) on the 2100 samples of its store outside the
calibration set (fp32 top-1 42.7 %). Agreement: same top-1 class of p_av; Δ: mean
|ln p_av - ln p_av(fp32)| (what the confidence calibration sees):

================================================ ============= =============
variant                                          trt agree / Δ cpu agree / Δ
================================================ ============= =============
Conv, Gemm, MatMul                               95.7 % / .078 96.2 % / .070
**Conv, Gemm, MatMul, Relu** (chosen)            96.1 % / .076 97.3 % / .056
chosen ops, per-tensor weights                                 96.8 % / .068
Conv, Gemm, MatMul: Percentile 99.999 ranges     96.1 % / .077 96.6 % / .064
Conv, Gemm, MatMul: Percentile 99.99 ranges      96.2 % / .099 96.8 % / .088
Conv, Gemm, MatMul: Entropy ranges (512 bins)    67.4 % / .76  67.5 % / .77
Conv, Gemm, MatMul: 20 calibration clips a class 95.6 % / .079 96.1 % / .065
================================================ ============= =============

On the 400 test clips alone, Conv + Gemm + MatMul agreed 94.5 % / 96.3 % (Δ .077 / .069); adding
Add (the ResNet and transformer residual sums) dropped that to 86-88 % (Δ .21-.27) whatever else
was added (MaxPool, Reshape / Transpose / Slice / Gather / Concat, LayerNormalization, Softmax:
none changed it by more than a point); onnxruntime's default op list, which also quantizes the
output Sigmoids and p_av = p_audio * p_visual, kept 86 / 87 % top-1 but wrecked ln p_av
(Δ 4.0 / 2.5), i.e. the runtime's confidence. Quantizing Relu helps instead, most in the CPU
graph, where onnxruntime drops the Relu into the u8 range of the Conv's output. So only OP_TYPES
are quantized; Add, MaxPool, LayerNormalization, Softmax, Sigmoid, Mul, Div, Erf and Einsum (the
grouping, which has no quantized kernel) stay float.

Ranges: MinMax. Percentile 99.999 was within noise of it (+0.4 point: 8 of 2100 clips), 99.99
clipped too much (Δ +27 %), and entropy-calibrated ranges (KL over 512-bin histograms, through
onnxruntime's calibrator) collapsed agreement; quantize_static's own Entropy option histograms in
128 bins with 128 quantized bins, which makes it equal to MinMax. MinMax has no percentile to tune
per model, and doubling the calibration set gained nothing.

Final numbers of the chosen recipes: int8-trt 96.1 % agreement (top-1 accuracy 42.4 % vs fp32
42.7 %), int8-cpu 97.3 % (42.3 %); on task_0.pt (2 classes, 420 clips, fp32 86.7 %) 99.3 %
(86.4 %) and 99.0 % (86.7 %). (The trt ablations above had int32 biases; float biases measured
the same to the third decimal.)
7-bit weights for the cpu graph: on x86 CPUs without VNNI (AVX2-only, and AVX-512 before
Cascade Lake) onnxruntime multiplies u8 x s8 with ``vpmaddubsw``, which adds two products into a
saturating int16: with 8-bit weights 255 x 127 x 2 = 64,770 > 32,767 and large pre-activations are
clipped; with 7-bit weights 255 x 64 x 2 = 32,640 fits. VNNI (``vpdpbusd``) and AMX accumulate in
int32 and never saturate, which is why the earlier 8-bit recipe measured well on this machine.
Measured with ``cign_runtime.isa``'s AVX2 mask (same core, AVX-512 / VNNI / AMX hidden), on the
CIGN of the default run (seed 0, task 4; fp32 audio-visual test accuracy 92.0 %) over the 2,200
clips of its store, agreement / Δ as above, and the audio-visual test accuracy:

=========================================== ============================= =============================
graph                                       this CPU (VNNI + AMX)         AVX2 kernels (masked)
=========================================== ============================= =============================
s8 weights, 8 bits (the earlier recipe)     99.77 % / .069, 91.75 %       95.27 % / 1.41, 89.25 %
s8 weights, 7 bits                          99.64 % / .083, 91.5 %        99.64 % / .083, 91.5 %
u8 weights (u8 x u8 kernels, no saturation) 99.73 % / .068, 91.75 %       99.73 % / .068, 91.75 %
**7 bits, attention products float**        99.68 % / .072, 91.5 %        99.68 % / .072, 91.5 %
=========================================== ============================= =============================

u8 weights run 2.2x slower than s8 on this CPU and 1.4x on the AVX2 kernels (paper preset, batch
1, 2 threads, interleaved calls), while 7 bits cost no time (0.999x / 0.991x of 8 bits). So one
graph serves every x86 CPU, 0.25 points below the 8-bit graph's best case
(``tests/test_isa.py`` checks a saturating convolution on both instruction sets).

``quant_pre_process`` is not run: the exporter's graph already carries every shape, and the Q/DQ
placement came out identical (124 QuantizeLinear, 185 DequantizeLinear) with and without it; so
quantize_static's log advice to run it is dropped while it runs.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from cign_runtime import trt_ops

TARGETS = ("trt", "cpu")
#: The ops whose inputs (weights and activations) are quantized; every other op runs in float.
OP_TYPES = ("Conv", "Gemm", "MatMul", "Relu")
#: target -> (activation type, symmetric activations, int32 biases, 7-bit weights). TensorRT's
#: DequantizeLinear takes INT8 / FP8 only (onnx-tensorrt operators.md), so its biases stay float;
#: its int8 x int8 kernels accumulate in int32, so its weights keep 8 bits.
_RECIPES = {"trt": (QuantType.QInt8, True, False, False), "cpu": (QuantType.QUInt8, False, True, True)}


class _NoPreProcessAdvice(logging.Filter):
    """Drops quantize_static's advice to run ``quant_pre_process`` first (measured to change nothing here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _without_pre_process_advice():
    root, advice = logging.getLogger(), _NoPreProcessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose inputs are both activations (neither an initializer nor a Constant)."""
    constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                              for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not constants.intersection(n.input)]


def quantize_int8(fp32_onnx: str | Path, out_onnx: str | Path, reader: CalibrationDataReader, target: str) -> Path:
    """Write the INT8 graph of ``fp32_onnx`` for ``target`` ("trt" or "cpu") to ``out_onnx``.

    ``reader`` yields the calibration feeds (``calibration.dataset.StoreReader``) and is consumed;
    the fp32 graph's metadata props are kept. Raises ValueError for another target, or (trt, and
    then no file is left) when the result has an op outside TensorRT 10's list.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown INT8 target {target!r}; choose from {TARGETS}")
    activation_type, symmetric, quantize_bias, seven_bit_weights = _RECIPES[target]
    out_onnx = Path(out_onnx)
    float_nodes = activation_matmuls(onnx.load(str(fp32_onnx), load_external_data=False)) if target == "cpu" else []
    with _without_pre_process_advice():
        quantize_static(
            str(fp32_onnx), str(out_onnx), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES),
            per_channel=True, reduce_range=seven_bit_weights, activation_type=activation_type,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_nodes,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": quantize_bias},
        )
    if target == "trt":
        try:
            trt_ops.check(onnx.load(str(out_onnx), load_external_data=False), str(out_onnx))
        except ValueError:
            out_onnx.unlink()
            raise
    return out_onnx
