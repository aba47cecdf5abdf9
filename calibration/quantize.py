"""INT8 graphs from the fp32 export: static post-training quantization with onnxruntime.

Two recipes, one per consumer (``cign_runtime.manifest.PRECISIONS`` "int8-trt", "int8-cpu"), both
QDQ with int8 weights quantized per output channel (symmetric), MinMax ranges from the
class-balanced calibration set (``calibration.dataset``), and the same quantized ops (OP_TYPES):

- ``trt``: int8 activations, symmetric, so every zero point is 0 as TensorRT requires; weights in
  [-127, 127]; biases stay float (TensorRT dequantizes INT8 / FP8 only, not int32 biases); the
  QuantizeLinear / DequantizeLinear ops stay in the default ONNX domain and the result is checked
  against TensorRT 10's operator list (``cign_runtime.trt_ops``). The float layers, those outside
  the Q/DQ pairs, are float16 but ``calibration.fp16.FP32_OPS`` and the outputs' ops
  (``calibration.fp16.fp16_layers``), with float16 Q/DQ scales (opset 19, the first whose Q/DQ take
  float16): TensorRT 11 runs each layer in its ONNX type, so this is INT8 + FP16 as TensorRT 10's
  ``--int8 --fp16``; NVIDIA ModelOpt's INT8 ONNX has the same form by default (float16 layers and
  scales, though it keeps no op type in float32). onnxruntime runs it with ORT_DISABLED_OPTIMIZERS
  off (below).
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
AVX512-BF16, AMX-INT8; random-weight CIGN exported with ``export_onnx``; s8 activations: the ``trt``
recipe with float32 layers, run as onnxruntime's default session runs it):

=================================== ========= =============== =========
graph                               fp32      s8 activations  int8-cpu
=================================== ========= =============== =========
cpu preset (D 256, depth 1), 2 thr  8.8 ms    13.1 ms         3.5 ms
cpu preset, 1 thread                16.5 ms   15.5 ms         4.6 ms
paper preset (D 512, depth 3,       46.5 ms   53.6 ms         19.0 ms
224 px, 257 x 300), 2 thr, 32 runs
=================================== ========= =============== =========

int8-cpu is 2.5x (3.6x on one thread, 2.4x at paper size) faster than fp32; the symmetric int8
activations TensorRT needs run 1.5x slower than fp32 on two threads and 6 % faster on one with
onnxruntime's x86 kernels, hence a separate CPU graph. The ``trt`` graph itself, with float16 layers,
has no integer kernel on onnxruntime's CPU provider (its Q/DQ pairs run in float): 23.5 ms against
fp32's 3.9 ms (cpu preset, two threads, another session; ``benchmarks/studies/fp16_arithmetic.py``).
Among u8 recipes, per-tensor QDQ ran as fast (3.5 ms) and QOperator slower (4.1 ms per channel and
per tensor), so the CPU recipe is QDQ per channel, the more accurate.

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

The placement and ranges above were measured with the trt graph's float layers in float32. Its float16
layers, on three trained avdigits models (``make bench-enroll``, 320 test clips each; Intel Xeon, 2
cores, AMX; ``benchmarks/studies/fp16_arithmetic.py``), computed in float16 as a GPU does
(``calibration.fp16.reference_outputs``: Q/DQ as ONNX defines them, float16 tensors between ops): top-1
of p_av agreed with fp32 on 955 of 960 clips (954 with float32 layers), mean |diff ln p_av| 0.093-0.107
(0.089-0.103), largest test-accuracy drop of a modality 0.94 point (0.62) for a goal of 1.0: within the
noise of 320 clips a model. With the normalisations in float16 too: 955 of 960, 0.095-0.105.
onnxruntime's CPU provider emulates the Q/DQ rounding (in float, then float32 convolutions), neither
float16 arithmetic nor TensorRT's int8 kernels: 955 of 960, 0.092-0.104, largest drop 0.62 point, with
ORT_DISABLED_OPTIMIZERS off. With them on, onnxruntime's default, WeightBiasQuantization computes each
Conv / Gemm bias as int32(round(bias / (input scale * weight scale))) in float16, which overflows:
926 of 960, 0.37-0.79, a visual drop of 5.6 points.

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
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from calibration.fp16 import FP32_OPS, fp16_layers
from cign_runtime import manifest as mf
from cign_runtime import trt_ops

TARGETS = ("trt", "cpu")
#: The first opset whose QuantizeLinear / DequantizeLinear take float16 (scales and the float side).
FP16_QDQ_OPSET = 19
#: onnxruntime graph optimizations every session running the ``trt`` graph disables (``InferenceSession(...,
#: disabled_optimizers=ORT_DISABLED_OPTIMIZERS)``): WeightBiasQuantization requantizes the float biases in
#: the scales' type, float16, which overflows (above). Defined with the manifest's precisions.
ORT_DISABLED_OPTIMIZERS = mf.DISABLED_OPTIMIZERS["int8-trt"]
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


def quantize_int8(fp32_onnx: str | Path, out_onnx: str | Path, reader: CalibrationDataReader, target: str,
                  keep_fp32: tuple[str, ...] | None = FP32_OPS) -> Path:
    """Write the INT8 graph of ``fp32_onnx`` for ``target`` ("trt" or "cpu") to ``out_onnx``.

    ``reader`` yields the calibration feeds (``calibration.dataset.StoreReader``) and is consumed;
    the fp32 graph's metadata props are kept. ``keep_fp32`` (trt): the op types whose layers stay
    float32 while the other float layers become float16; None keeps every float layer float32, as
    quantize_static writes it. Raises ValueError for another target, or (trt, and then no file is
    left) when the result has an op outside TensorRT 10's list.
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
        model = onnx.load(str(out_onnx))
        if keep_fp32 is not None:
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            model = fp16_layers(version_converter.convert_version(model, max(opset, FP16_QDQ_OPSET)), keep_fp32)
            onnx.save(model, str(out_onnx))
            onnx.checker.check_model(str(out_onnx))
        try:
            trt_ops.check(model, str(out_onnx))
        except ValueError:
            out_onnx.unlink()
            raise
    return out_onnx
