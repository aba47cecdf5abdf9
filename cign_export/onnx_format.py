"""ONNX export of an :class:`~cign_export.graph.ExportGraph`: one self-contained file per graph.

The torch.export-based exporter (``dynamo=True``, onnxscript) is used because the TorchScript one
bakes P + K into ``nn.MultiheadAttention``'s reshapes: a graph exported at K = 10 then fails at
K = 4, which rules out a token table given as an input. The batch axis (and K with tokens as input)
is dynamic; weights are stored inside the file.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from cign_runtime import trt_ops
from cign_export.graph import ExportGraph
from cign_runtime import manifest as mf

DEFAULT_OPSET = 18
OPSETS = (17, 20)  # LayerNormalization needs 17; TensorRT 10's parser reads up to 20
EXAMPLE_BATCH = 2  # a batch of 1 would let torch.export specialise the batch axis


def example_inputs(graph: ExportGraph, batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's shapes: frames in [0, 255], log spectrograms around the data's range."""
    g = torch.Generator().manual_seed(seed)
    spec = graph.spec
    frame = torch.rand(batch, 3, spec.frame_size, spec.frame_size, generator=g) * 255
    spectrogram = torch.randn(batch, 1, spec.n_freq, spec.n_time, generator=g) * 4 - 8
    if graph.tokens_as_input:
        return frame, spectrogram, graph.model.tokens.detach().clone()
    return frame, spectrogram


def export_onnx(graph: ExportGraph, path: Path, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None,
                outputs: tuple[str, ...] = mf.OUTPUTS) -> Path:
    """Write ``graph`` to ``path`` as ONNX (opset ``opset``), with ``metadata`` in ``metadata_props``.
    ``outputs`` names the graph's outputs (``cign_export.enrolment.Encoders``: ``manifest.FEATURES``).

    The file passes ``onnx.checker`` (full check) and TensorRT 10's operator list, or this raises.
    """
    import onnx

    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset {opset} not supported: choose {OPSETS[0]}..{OPSETS[1]}")
    path = Path(path)
    args = example_inputs(graph)
    names = [mf.FRAME, mf.SPECTROGRAM] + ([mf.TOKENS] if graph.tokens_as_input else [])
    batch = torch.export.Dim("batch", min=1)
    dynamic = {mf.FRAME: {0: batch}, mf.SPECTROGRAM: {0: batch}}
    if graph.tokens_as_input:
        dynamic[mf.TOKENS] = {0: torch.export.Dim("classes", min=1)}
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, args, dynamo=True, input_names=names, output_names=list(outputs), dynamic_shapes=dynamic,
            opset_version=opset, optimize=True, verbose=False, external_data=False,
        )
    model = program.model_proto
    _rename_dims(model)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in (metadata or {}).items()})
    onnx.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    trt_ops.check(model, str(path))
    return path


def _rename_dims(model) -> None:
    """Dynamic axes get the manifest's names ("batch", "classes") whatever torch.export called them."""
    by_input = {}
    for value in model.graph.input:
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.dim_param:
            by_input[dim0.dim_param] = "classes" if value.name == mf.TOKENS else "batch"
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in by_input:
                dim.dim_param = by_input[dim.dim_param]


class _quiet:
    """Silence the exporter's progress loggers during an export (they print per pass)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
