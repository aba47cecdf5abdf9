"""PyTorch as a deployment backend: ``torch-cuda`` (desktop GPUs, Jetson with JetPack's torch) and
``torch-cpu`` (parity checks), behind the runtime's :class:`cign_runtime.backends.Model`.

The runner rebuilds the export's source checkpoint (its sha256 checked against the manifest's) as
:class:`cign_export.graph.ExportGraph`, the computation the ONNX graphs hold: the same inputs (raw
RGB frame, raw log spectrogram, the token table for tokens-as-input exports), the normalisation
inside, and p_audio, p_visual, p_av = p_a * p_v (Sec. 3.3) out, float32, at batch N.

- precision (``TORCH_PRECISIONS``): fp32 (IEEE: TF32 is switched off for it), fp16 or bf16
  weights and arithmetic; inputs, normalisation and outputs stay float32 (``ExportGraph``).
- mode (``TORCH_MODES``): ``eager``; ``graph``, one CUDA graph per input shape captured after a
  warm-up on a side stream, with static input buffers, so one prediction is two host-to-device
  copies, one replay and one copy back; ``compile``, ``torch.compile``; ``compile-graph``, the
  compiled model captured in a CUDA graph. ``compile:MODE`` / ``compile-graph:MODE`` pass
  torch.compile's mode (default ``default``; ``compile-graph`` takes the modes without CUDA
  graphs of their own). Batch-1 eager PyTorch on a GPU is bound by kernel launches; the graph
  replays them in one call (``cign-bench`` measures each mode).

Registered with the runtime through the ``cign_runtime.runners`` entry point ``torch``, so the
torch-free runtime never imports this module by name.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cign_export.graph import ExportGraph
from cign_runtime import manifest as mf
from cign_runtime.backends import TORCH_MODES, TORCH_PRECISIONS, BackendUnavailable, empty_outputs
from cign_train.checkpoint import TaskCheckpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Warm-up calls on a side stream before a CUDA graph is captured (cuDNN / cuBLAS pick their kernels there).
WARMUP = 3
#: torch.compile modes that capture CUDA graphs themselves (not nestable in ``compile-graph``).
SELF_GRAPHING = ("reduce-overhead", "max-autotune")


def parse_mode(mode: str, device: str) -> tuple[str, str | None]:
    """``MODE[:COMPILE_MODE]`` -> (mode, torch.compile mode or None); ValueError naming what is wrong."""
    base, _, compile_mode = mode.partition(":")
    if base not in TORCH_MODES:
        raise ValueError(f"torch mode {mode!r}: not one of {TORCH_MODES} (compile modes as compile:MODE)")
    if compile_mode and not base.startswith("compile"):
        raise ValueError(f"torch mode {mode!r}: only compile and compile-graph take a torch.compile mode")
    if base.endswith("graph") and device != "cuda":
        raise ValueError(f"torch mode {base!r} captures a CUDA graph: it needs torch-cuda")
    if base == "compile-graph" and compile_mode in SELF_GRAPHING:
        raise ValueError(f"torch mode {mode!r}: torch.compile mode {compile_mode!r} captures CUDA graphs itself; "
                         f"use compile:{compile_mode}")
    return base, (compile_mode or "default") if base.startswith("compile") else None


def source_checkpoint(root: Path, manifest: mf.Manifest, backend: str) -> Path:
    """The export's source checkpoint: at the manifest's path or, copied with the export to a device, beside
    its manifest under the same name; its sha256 must be the manifest's. BackendUnavailable otherwise."""
    recorded = Path(manifest.checkpoint["path"])
    found = [p for p in (recorded, Path(root) / recorded.name) if p.is_file()]
    if not found:
        raise BackendUnavailable(f"{backend}: the export's source checkpoint {recorded} is not on this machine, nor "
                                 f"{Path(root) / recorded.name} (the torch backends rebuild the model from it)")
    for path in found:
        if mf.sha256(path) == manifest.checkpoint["sha256"]:
            return path
    raise BackendUnavailable(f"{backend}: {found[0]} changed since the export (sha256 differs from the manifest's)")


class TorchRunner:
    """The export's computation in PyTorch on ``device`` at ``precision`` in ``mode`` (see the module)."""

    def __init__(self, root: Path, manifest: mf.Manifest, backend: str, precision: str, mode: str,
                 threads: int | None = None):
        device = backend.removeprefix("torch-")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{backend}: torch {torch.__version__} sees no CUDA GPU")
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"{backend}: precision {precision!r} is not one of {TORCH_PRECISIONS}")
        self.mode, compile_mode = parse_mode(mode, device)
        ckpt = TaskCheckpoint.load(source_checkpoint(root, manifest, backend))
        if ckpt.spec != manifest.spec:
            raise BackendUnavailable(f"{backend}: the checkpoint's preprocessing spec differs from {root}'s manifest")
        if threads is not None and device == "cpu":
            torch.set_num_threads(threads)
        if device == "cuda" and precision == "fp32":  # fp32 means IEEE fp32 here, as in onnxruntime
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device, self.precision = torch.device(device), precision
        self.graph = ExportGraph(ckpt.build_model(), ckpt.spec, manifest.tokens_as_input, DTYPES[precision])
        self.graph.to(self.device)
        self.forward = self.graph if compile_mode is None else torch.compile(self.graph, mode=compile_mode, dynamic=False)
        self.tokens_as_input = manifest.tokens_as_input
        self.captured: dict[tuple, tuple] = {}  # input shapes -> (CUDA graph, static inputs, static outputs)
        self.tables: dict[tuple, np.ndarray] = {}  # input shapes -> the token table in that graph's buffer

    def _inputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds[mf.FRAME], feeds[mf.SPECTROGRAM]] + ([feeds[mf.TOKENS]] if self.tokens_as_input else [])

    def _capture(self, arrays: list[np.ndarray]) -> tuple:
        """A CUDA graph of one forward on static buffers shaped like ``arrays`` (warmed up on a side stream)."""
        static = [torch.from_numpy(a).to(self.device) for a in arrays]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP):
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = self.forward(*static)
        return graph, static, outputs

    def _load(self, arrays: list[np.ndarray]) -> tuple:
        """Copy ``arrays`` into the captured graph's static inputs (the token table only when it changed)."""
        key = tuple(a.shape for a in arrays)
        if key not in self.captured:
            self.captured[key] = self._capture(arrays)
        graph, static, outputs = self.captured[key]
        for i, (buffer, array) in enumerate(zip(static, arrays)):
            if i < 2 or array is not self.tables.get(key):
                buffer.copy_(torch.from_numpy(array))
        if self.tokens_as_input:
            self.tables[key] = arrays[2]
        return graph, outputs

    def _call(self, arrays: list[np.ndarray]):
        """The outputs as tensors on the device (not yet synchronised)."""
        if self.mode.endswith("graph"):
            graph, outputs = self._load(arrays)
            graph.replay()
            return outputs
        with torch.inference_mode():
            return self.forward(*[torch.from_numpy(a).to(self.device) for a in arrays])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(feeds[mf.FRAME]) == 0:  # nothing to run (a CUDA graph would be captured for it)
            return empty_outputs(feeds, self.graph.model.n_classes)
        outputs = self._call(self._inputs(feeds))
        return {name: out.cpu().numpy() for name, out in zip(mf.OUTPUTS, outputs)}

    def split_times(self, feeds: dict[str, np.ndarray]) -> dict[str, float]:
        """One call of a CUDA-graph mode timed as trtexec splits it (ms): the copies into the static inputs,
        the replay, the copies back, each ended by a synchronisation."""
        if not self.mode.endswith("graph"):
            raise ValueError("split_times times the CUDA-graph modes")
        arrays = self._inputs(feeds)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph, outputs = self._load(arrays)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        [out.cpu() for out in outputs]
        t3 = time.perf_counter()
        return {"h2d_ms": (t1 - t0) * 1e3, "compute_ms": (t2 - t1) * 1e3, "d2h_ms": (t3 - t2) * 1e3}

    def close(self) -> None:
        self.captured.clear()
        self.graph = self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def gpu_peak_tflops(precision: str, n: int = 8192, calls: int = 10) -> float:
    """Measured dense matrix-product rate of this GPU at ``precision`` (TFLOP/s): ``calls`` n x n x n
    products after three warm-ups, timed with CUDA events (fp32 with TF32 off, as the fp32 backend runs)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device="cuda", dtype=DTYPES[precision])
        b = torch.randn(n, n, device="cuda", dtype=DTYPES[precision])
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            a @ b
        end.record()
        torch.cuda.synchronize()
        return 2 * n**3 * calls / (start.elapsed_time(end) * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
