"""FP16 ONNX from the fp32 export: float16 weights and arithmetic, float32 inputs and outputs.

onnxruntime's converter (``onnxruntime.transformers.float16``) rewrites every float tensor to
float16 and, with ``keep_io_types``, puts a Cast after the float32 inputs and before the float32
outputs, so the runtime feeds ``cign_runtime.manifest.feed`` dicts unchanged. Nodes onnxruntime's
CPU provider has no float16 kernel for run behind Casts it inserts itself, so the file loads and
runs on the CPU as well as on CUDA / TensorRT.

No op is blocked: the all-fp16 graph meets TOLERANCE. Measured against the fp32 graph for a CIGN
trained by the default ``cign-train`` run (avdigits, cpu preset; task_4.pt on the 2100 samples of
its store outside the calibration set, task_0.pt on 420): largest |diff| 3.3e-3 (p_audio), 1.4e-3
(p_visual), 1.6e-3 (p_av); mean |diff ln p_av| 1.2e-3; top-1 of p_av agreed on 2097 of 2100 and
420 of 420 clips (the three flips were near-ties: fp32 top-2 gaps of 2e-5 to 2e-4, median 0.034).
On onnxruntime's CPU provider it is no faster than fp32 (10.3 vs 8.8 ms, ``calibration.quantize``):
this graph is for GPUs.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

#: Largest |p_fp16 - p_fp32| accepted on any output (p_audio, p_visual, p_av, all in [0, 1]):
#: three times the largest difference measured above.
TOLERANCE = 1e-2


def to_fp16(fp32_onnx: str | Path, out_onnx: str | Path) -> Path:
    """Write the FP16 version of ``fp32_onnx`` to ``out_onnx``; its metadata props are kept."""
    model = convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True)
    OnnxModel(model).topological_sort()  # the converter appends the input Casts after their consumers
    out_onnx = Path(out_onnx)
    onnx.save(model, str(out_onnx))
    onnx.checker.check_model(str(out_onnx))
    return out_onnx
