"""TensorRT engines from the exported ONNX (TensorRT 10 and 11), and the equivalent trtexec commands.

Kept thin, against the documented Python API (``../shared/reference/tensorrt-10-vs-11.md``):
``Builder`` -> ``create_network`` -> ``OnnxParser.parse_from_file`` -> builder config with an
optimisation profile per dynamic input and a timing cache -> ``build_serialized_network``.

Precision: TensorRT 10 builds FP16 from the fp32 ONNX with ``BuilderFlag.FP16`` and INT8 from the
Q/DQ ONNX with ``BuilderFlag.INT8`` (no calibrator: deprecated in 10, removed in 11). TensorRT 11 is
strongly typed and has no precision flags, so each engine is built from the ONNX of its own
precision (the FP16 ONNX, the Q/DQ ONNX). Engines are specific to the GPU and TensorRT version that
built them, so a Jetson user builds on the device with the trtexec line written next to the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cign_runtime import manifest as mf

WORKSPACE_BYTES = 1 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says what and how to build on a device instead."""


@dataclass(frozen=True)
class Profile:
    """Shape ranges of the dynamic inputs: {input name: (min, opt, max) shapes}."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def for_inputs(cls, inputs: list[mf.TensorInfo], max_batch: int, classes: tuple[int, int, int]) -> "Profile":
        """Batch 1 / 1 / ``max_batch``; K (tokens as input) ``classes`` = (min, opt, max)."""
        shapes = {}
        for info in inputs:
            dims = [[d] * 3 if isinstance(d, int) else list((1, 1, max_batch) if d == "batch" else classes)
                    for d in info.shape]
            shapes[info.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
        return cls(shapes)

    def trtexec_flags(self) -> list[str]:
        flags = []
        for i, kind in enumerate(("min", "opt", "max")):
            text = ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in self.shapes.items())
            flags.append(f"--{kind}Shapes={text}")
        return flags


def onnx_source(precision: str, version: int) -> str:
    """Which exported ONNX an engine of ``precision`` is built from under TensorRT ``version``."""
    if precision == "fp16" and version < 11:
        return "fp32"  # TensorRT 10: weak typing + BuilderFlag.FP16
    return precision


def trtexec_command(onnx_files: dict[str, str], precision: str, version: int, profile: Profile, engine: str,
                    cache: str = "timing.cache") -> str:
    """The trtexec line that builds the same engine on a device (TensorRT ``version`` 10 or 11)."""
    parts = ["trtexec", f"--onnx={onnx_files[onnx_source(precision, version)]}", f"--saveEngine={engine}"]
    if version < 11:
        parts += {"fp32": [], "fp16": ["--fp16"], "int8-trt": ["--int8"]}[precision]
    parts += profile.trtexec_flags() + [f"--timingCacheFile={cache}"]
    return " ".join(parts)


def trtexec_script(onnx_files: dict[str, str], precisions: list[str], profile: Profile) -> str:
    """A shell script with the trtexec line of every engine for TensorRT 10 and for TensorRT 11."""
    lines = ["#!/bin/sh", "# Build the engines on the target device (engines are specific to GPU and TensorRT version).",
             "set -e", 'cd "$(dirname "$0")"', 'TRT_MAJOR=${TRT_MAJOR:-$(python3 -c "import tensorrt; print(tensorrt.__version__.split(\'.\')[0])")}']
    for version in (10, 11):
        lines.append(f'if [ "$TRT_MAJOR" {"=" if version == 10 else "-ge"} {version} ]; then')
        for p in precisions:
            lines.append("  " + trtexec_command(onnx_files, p, version, profile, engine_name(p)))
        lines.append("fi")
    return "\n".join(lines) + "\n"


def engine_name(precision: str) -> str:
    return f"model_{precision}.plan"


def import_tensorrt():
    """``tensorrt`` and its major version, or TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({e}); install it on a machine with an NVIDIA GPU "
            "(pip install 'cign-edge[trt]') or build on the device with the trtexec lines in trtexec.sh"
        ) from e
    return trt, int(trt.__version__.split(".")[0])


def build_engine(onnx_path: Path, engine_path: Path, precision: str, profile: Profile, cache_path: Path) -> Path:
    """Parse ``onnx_path``, build a serialized engine of ``precision`` and write it and the timing cache."""
    trt, version = import_tensorrt()
    if version < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; this exporter targets TensorRT 10 and 11")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTUnavailable("TensorRT could not create a builder: no usable CUDA GPU")
    network = builder.create_network(0)  # explicit batch is the only mode since 10; 11 is strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if version < 11:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8-trt":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ scales; no calibrator
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build a {precision} engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path
