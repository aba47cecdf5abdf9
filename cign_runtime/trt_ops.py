"""TensorRT 10's ONNX parser operator support (onnx-tensorrt ``docs/operators.md``, TensorRT 10.0,
opsets 9-20): the operators marked supported, so an export can refuse a graph TensorRT cannot parse.
"""
from __future__ import annotations

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
OPSETS = (9, 20)  # the parser's opset range


def unsupported(model) -> dict[str, int]:
    """Operators of an ``onnx.ModelProto`` (main graph and subgraphs) outside TensorRT 10's list, with counts.

    Only the default ONNX domain is TensorRT's to parse; an op of another domain (e.g. onnxruntime's
    ``com.microsoft`` fusions) counts as unsupported.
    """
    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if name not in SUPPORTED:
                counts[name] = counts.get(name, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return counts


def check(model, where: str) -> None:
    """Raise ValueError naming the operators TensorRT 10 cannot parse, or an opset outside 9-20."""
    bad = unsupported(model)
    if bad:
        raise ValueError(f"{where}: operators outside TensorRT 10's ONNX support list: {bad}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"{where}: opset {opset} outside TensorRT 10's range {OPSETS}")
