"""FP16 ONNX from the fp32 export: float16 weights and arithmetic, float32 normalisations, reductions and
outputs' ops, float32 inputs and outputs.

TensorRT 11 builds strongly typed engines: each layer computes in the type its ONNX tensors have (TensorRT
10 under ``--fp16`` chose per layer and kept normalisation layers in float32 on its own). So the graph says
where float32 stays: the op types of FP32_OPS (normalisations, Softmax, the reductions that sum and the
exp / log / pow steps of decomposed ones: PyTorch's CUDA autocast float32 list in ONNX terms; NVIDIA
ModelOpt's AutoCast has no op-type default, it keeps nodes whose values exceed 512 on sample inputs) and
the ops that write the graph outputs (CIGN's two Sigmoids and p_av = p_audio * p_visual), each behind
Casts; every other float tensor is float16. onnxruntime's converter (``convert_float_to_float16``:
``op_block_list``, ``node_block_list``, ``keep_io_types``) rewrites the graph; the float32 -> float16 ->
float32 Casts it leaves between two float32 ops are removed.

Measured on three trained avdigits models (``make bench-enroll``, 320 test clips each; Intel Xeon, 2 cores,
AMX; ``benchmarks/studies/fp16_arithmetic.py``) against the fp32 graph, computed in float16 as a GPU does
(:func:`reference_outputs`; onnxruntime's CPU provider runs most of an FP16 graph in float32 and hid both
effects below: mean |diff ln p_av| 0.002-0.003 whatever the variant):

- the outputs' ops matter: with every layer float16, small p_audio / p_visual and their product fall to
  float16 subnormals or 0 (42-90 p_av entries of 2560 per model were 0) and mean |diff ln p_av|, what the
  runtime's confidence reads, was 0.18-0.33; with those ops in float32, 0.003-0.006;
- keeping normalisations and reductions in float32 mattered little on this model: 0.0029-0.0059 against
  0.0032-0.0061 with them in float16, 0.0041-0.0067 (and one top-1 flip in 960 clips) if their sums also
  accumulate in float16 (a kernel that sums in float16). It costs nothing measurable and is what TensorRT
  10 did under ``--fp16``, so the graph keeps it;
- the FP16 graph as written: top-1 of p_av agreed on 960 of 960 clips, test accuracy unchanged for every
  modality, largest |diff| 1.8e-2 (p_audio; 6.4e-3 in onnxruntime's CPU provider).

On onnxruntime's CPU provider the graph is slower than fp32 (4.6 vs 3.9 ms, ``cpu`` preset, batch 1, two
threads): it is for GPUs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import load_op
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

#: Largest |p_fp16 - p_fp32| accepted on any output (p_audio, p_visual, p_av, all in [0, 1]): about three
#: times the largest difference measured in float16 arithmetic (1.8e-2, above).
TOLERANCE = 5e-2
#: Op types kept in float32, behind Casts: normalisations (statistics over a tensor), softmax, reductions
#: that sum, and the exp / log / power steps of decomposed normalisations.
FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
            "MeanVarianceNormalization", "RMSNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum",
            "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Pow",
            "Sqrt", "Reciprocal", "Exp", "Log")


def fp16_layers(model: onnx.ModelProto, keep_fp32=FP32_OPS) -> onnx.ModelProto:
    """``model`` with every float tensor in float16 but those of the ``keep_fp32`` op types and of the ops
    writing the graph outputs (float32, behind Casts) and the graph's inputs and outputs (float32)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = {i.name for i in model.graph.initializer}  # the converter would retype their value_info, not them
    for info in [v for v in model.graph.value_info if v.name in weights]:
        model.graph.value_info.remove(info)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    heads = [producer[o.name] for o in model.graph.output if producer.get(o.name)]
    kept = {n.name for n in model.graph.node if n.name and n.op_type in keep_fp32} | set(heads)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32],
                                     node_block_list=heads)
    _skip_round_trips(model.graph, kept)
    OnnxModel(model).topological_sort()  # the converter appends its Casts after their consumers
    return model


def to_fp16(fp32_onnx: str | Path, out_onnx: str | Path, keep_fp32=FP32_OPS) -> Path:
    """Write the FP16 version of ``fp32_onnx`` to ``out_onnx`` (:func:`fp16_layers`); its metadata props are kept."""
    out_onnx = Path(out_onnx)
    onnx.save(fp16_layers(onnx.load(str(fp32_onnx)), keep_fp32), str(out_onnx))
    onnx.checker.check_model(str(out_onnx))
    return out_onnx


def reference_outputs(onnx_path: str | Path, feeds: dict[str, np.ndarray], extra_ops=()) -> dict[str, np.ndarray]:
    """The graph's outputs computed op by op in numpy, each op in its tensors' own type (``onnx.reference``).

    float16 tensors stay float16 between ops, as on a GPU, unlike onnxruntime's CPU provider, which runs
    ops without a float16 kernel (Conv, MatMul, Gemm, ...) in float32 and removes the Casts between them.
    Element-wise ops round each result to float16; Conv, Gemm, MatMul and Einsum multiply float16
    operands and sum in float32 (as tensor cores do, and as numpy's own float16 matmul does), then round.
    ``extra_ops``: more ``onnx.reference`` op classes, replacing those of the same name.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    evaluator = ReferenceEvaluator(model, new_ops=[*_REFERENCE_OPS, *extra_ops])
    names = [o.name for o in model.graph.output]
    with np.errstate(over="ignore"):  # onnx.reference's Sigmoid evaluates exp(-x) on both sides of 0
        return dict(zip(names, evaluator.run(names, feeds)))


def _float32_sums(op_type: str):
    base = load_op("", op_type, 18)

    def run(self, *args, **attributes):
        half = any(getattr(a, "dtype", None) == np.float16 for a in args)
        wide = [a.astype(np.float32) if getattr(a, "dtype", None) == np.float16 else a for a in args]
        out = base._run(self, *wide, **attributes)
        return tuple(o.astype(np.float16) for o in out) if half else out

    return type(op_type, (base,), {"_run": run})


class _MaxPool(load_op("", "MaxPool", 18)):
    """onnx.reference's MaxPool loops in Python; windows that tile the input (kernel == stride, no
    padding) are one reshape. Exact in any type."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        tiled = (len(kernel_shape) == 2 and list(kernel_shape) == list(strides or []) and not any(pads or [])
                 and set(dilations or [1]) == {1} and auto_pad in (None, "NOTSET", b"NOTSET")
                 and len(self.onnx_node.output) == 1)
        if not tiled:
            return super()._run(x, auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order, strides)
        (kh, kw), (h, w) = kernel_shape, x.shape[2:]
        oh, ow = (-(-h // kh), -(-w // kw)) if ceil_mode else (h // kh, w // kw)
        x = np.pad(x[:, :, : oh * kh, : ow * kw], [(0, 0), (0, 0), (0, oh * kh - min(h, oh * kh)),
                                                  (0, ow * kw - min(w, ow * kw))], constant_values=-np.inf)
        return (x.reshape(*x.shape[:2], oh, kh, ow, kw).max(axis=(3, 5)),)


_MaxPool.__name__ = "MaxPool"
_QDQ = [type(t, (load_op("", t, None),), {}) for t in ("QuantizeLinear", "DequantizeLinear")]  # at opset < 19 too
_REFERENCE_OPS = [*(_float32_sums(t) for t in ("Conv", "Gemm", "MatMul", "Einsum")), _MaxPool, *_QDQ]


def _cast_to(node: onnx.NodeProto | None) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node and node.op_type == "Cast" else None


def _skip_round_trips(graph: onnx.GraphProto, kept: set[str]) -> None:
    """Feed float32 consumers and outputs straight from a kept op: the converter casts a kept op's output
    to float16 and back to float32 when the next op, or the graph output, is float32 too."""
    producer = {o: n for n in graph.node for o in n.output}

    def fp32_source(name: str) -> str | None:
        up = producer.get(name)
        down = producer.get(up.input[0]) if _cast_to(up) == TensorProto.FLOAT else None
        source = producer.get(down.input[0]) if _cast_to(down) == TensorProto.FLOAT16 else None
        return down.input[0] if source is not None and source.name in kept else None

    for node in graph.node:
        node.input[:] = [fp32_source(name) or name for name in node.input]
    for output in graph.output:
        if (source := fp32_source(output.name)) is not None:
            graph.node.remove(producer[output.name])
            for node in graph.node:
                node.input[:] = [output.name if name == source else name for name in node.input]
                node.output[:] = [output.name if name == source else name for name in node.output]
    while dead := [n for n in graph.node if n.op_type == "Cast" and not _consumed(graph).intersection(n.output)]:
        for n in dead:
            graph.node.remove(n)
    names = {o for n in graph.node for o in n.output}
    for info in [v for v in graph.value_info if v.name not in names]:
        graph.value_info.remove(info)


def _consumed(graph: onnx.GraphProto) -> set[str]:
    return {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
