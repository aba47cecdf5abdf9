"""TensorRT engines from the exported ONNX (TensorRT 10 and 11), and ``trtexec.sh``, which builds the same engines.

Kept thin, against the documented Python API (``../shared/reference/tensorrt-10-vs-11.md``):
``Builder`` -> ``create_network`` -> ``OnnxParser.parse_from_file`` -> builder config with an
optimisation profile per dynamic input, a workspace limit and a timing cache -> ``build_serialized_network``.

Precision (:func:`builder_flags`, shared by both paths): TensorRT 10 builds FP16 from the fp32 ONNX with
``BuilderFlag.FP16``, and INT8 from the Q/DQ ONNX with ``BuilderFlag.INT8`` and ``FP16`` together: with
INT8 alone every layer outside a Q/DQ pair (the float attention products, softmax, normalisation,
sigmoid) runs in fp32 / TF32, and trtexec itself suggests ``--fp16`` then. No calibrator: deprecated in
10, removed in 11. TensorRT 11 is strongly typed and has no precision flags, so each engine is built
from the ONNX of its own precision and the ONNX's types decide.

Engines and timing caches are specific to the GPU and the TensorRT version that made them: a Jetson
user builds on the device with ``trtexec.sh``, and the timing cache is named after both
(:func:`timing_cache_name`), so a cache from another device is never offered to trtexec, which loads
caches with mismatches ignored.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cign_runtime import manifest as mf

log = logging.getLogger("cign_export.tensorrt")

WORKSPACE_BYTES = 1 << 30
#: trtexec's ``--memPoolSize`` takes MiB when the size has no suffix.
WORKSPACE_MIB = WORKSPACE_BYTES >> 20
#: Oldest TensorRT major version the engines are written for.
MIN_MAJOR = 10
#: Where JetPack's ``libnvinfer-bin`` installs trtexec (not on PATH).
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
#: On a Jetson (L4T release file present) the board's model names the device: nvidia-smi says "Orin"
#: for every Orin module.
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


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


def builder_flags(precision: str, version: int) -> list[str]:
    """``BuilderFlag`` names for an engine of ``precision`` under TensorRT ``version`` (none from 11 on)."""
    if version >= 11:
        return []
    return {"fp32": [], "fp16": ["FP16"], "int8-trt": ["INT8", "FP16"]}[precision]


def trtexec_command(onnx_files: dict[str, str], precision: str, version: int, profile: Profile, engine: str,
                    cache: str = '"$CACHE"', exe: str = '"$TRTEXEC"') -> str:
    """The trtexec line that builds the same engine as :func:`build_engine` (TensorRT ``version`` 10 or 11);
    ``exe`` and ``cache`` default to ``trtexec.sh``'s variables."""
    parts = [exe, f"--onnx={onnx_files[onnx_source(precision, version)]}", f"--saveEngine={engine}"]
    parts += [f"--{flag.lower()}" for flag in builder_flags(precision, version)]
    parts += profile.trtexec_flags() + [f"--memPoolSize=workspace:{WORKSPACE_MIB}", f"--timingCacheFile={cache}"]
    return " ".join(parts)


#: trtexec.sh up to the build lines: find trtexec, its TensorRT version and the GPU, name the timing cache.
_SCRIPT_HEAD = r"""#!/bin/sh
# Builds this export's TensorRT engines here: engines and timing caches are specific to the GPU and the
# TensorRT version that made them. POSIX sh (dash on JetPack).
#   TRTEXEC    the trtexec to run (default: trtexec on PATH, else JetPack's @JETPACK@)
#   TRT_MAJOR  TensorRT's major version, where neither trtexec's banner nor dpkg tells it
set -e
cd "$(dirname "$0")"
die() { echo "trtexec.sh: $*" >&2; exit 1; }

if [ -n "${TRTEXEC:-}" ]; then
  case $TRTEXEC in
    */*) [ -f "$TRTEXEC" ] && [ -x "$TRTEXEC" ] ;;
    *) command -v "$TRTEXEC" >/dev/null 2>&1 ;;
  esac || die "TRTEXEC=$TRTEXEC is not an executable"
elif command -v trtexec >/dev/null 2>&1; then
  TRTEXEC=$(command -v trtexec)
elif [ -x @JETPACK@ ]; then
  TRTEXEC=@JETPACK@
else
  die "trtexec not found: not on PATH, not at @JETPACK@ (JetPack: sudo apt install libnvinfer-bin);" \
      "set TRTEXEC=/path/to/trtexec"
fi

# trtexec prints "[TensorRT vNNNNNN]" before anything else, --help included: major*10000 + minor*100 + patch
# from TensorRT 10 on, major*1000 + minor*100 + patch before.
CODE=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9][0-9]*\)\].*/\1/p' | head -n 1)
if [ -n "$CODE" ] && [ "$CODE" -ge 100000 ]; then
  TRT_VERSION=$((CODE / 10000)).$((CODE / 100 % 100)).$((CODE % 100))
elif [ -n "$CODE" ]; then
  TRT_VERSION=$((CODE / 1000)).$((CODE / 100 % 10)).$((CODE % 100))
else
  TRT_VERSION=$({ dpkg-query -W -f='${Version}\n' libnvinfer-bin tensorrt 2>/dev/null || true; } \
    | sed -n 's/^\([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
fi
TRT_MAJOR=${TRT_MAJOR:-${TRT_VERSION%%.*}}
[ -n "$TRT_MAJOR" ] || die "cannot tell the TensorRT version: $TRTEXEC --help printed no [TensorRT v...] banner" \
  "and dpkg knows no libnvinfer-bin or tensorrt package; set TRT_MAJOR"
case $TRT_MAJOR in *[!0-9]*) die "TRT_MAJOR=$TRT_MAJOR is not a number";; esac
if [ "$TRT_MAJOR" -lt @MIN_MAJOR@ ]; then
  die "TensorRT ${TRT_VERSION:-$TRT_MAJOR} found ($TRTEXEC); these engines need TensorRT @MIN_MAJOR@ or newer" \
      "(JetPack 6.1 and later ship TensorRT 10.3; JetPack 5 ships 8.5, JetPack 6.0 ships 8.6)"
fi

if [ -r /etc/nv_tegra_release ] && [ -r /proc/device-tree/model ]; then
  GPU=$(tr -d '\000' < /proc/device-tree/model)
else
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
SLUG=$(printf '%s' "${GPU:-unknown gpu}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
CACHE=timing_${SLUG:-unknown-gpu}_trt${TRT_VERSION:-$TRT_MAJOR}.cache
echo "trtexec.sh: TensorRT ${TRT_VERSION:-$TRT_MAJOR} ($TRTEXEC), GPU ${GPU:-unknown}, timing cache $CACHE"
"""


def trtexec_script(onnx_files: dict[str, str], precisions: list[str], profile: Profile) -> str:
    """``trtexec.sh``: finds trtexec and TensorRT's version, then runs the TensorRT 10 or 11+ line of every engine."""
    head = _SCRIPT_HEAD.replace("@JETPACK@", JETPACK_TRTEXEC).replace("@MIN_MAJOR@", str(MIN_MAJOR))
    lines = [head.rstrip("\n")]
    for version, test in ((10, "-eq 10"), (11, "-ge 11")):
        lines.append(f'if [ "$TRT_MAJOR" {test} ]; then')
        for p in precisions:
            lines += [f'  echo "trtexec.sh: {engine_name(p)}"',
                      "  " + trtexec_command(onnx_files, p, version, profile, engine_name(p))]
        lines.append("fi")
    return "\n".join(lines) + "\n"


def engine_name(precision: str) -> str:
    return f"model_{precision}.plan"


def slug(text: str) -> str:
    """Lower case, every run of other characters one hyphen: ``trtexec.sh``'s rule for the GPU name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name() -> str:
    """The GPU as ``trtexec.sh`` names it: a Jetson's board model, else nvidia-smi's first GPU name."""
    if TEGRA_RELEASE.is_file() and DEVICE_TREE_MODEL.is_file():
        return DEVICE_TREE_MODEL.read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.stdout.splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else ""


def timing_cache_name(gpu: str, version: str) -> str:
    """``timing_<gpu>_trt<major.minor.patch>.cache``: a cache per device and TensorRT version."""
    release = ".".join(version.split(".")[:3])
    return f"timing_{slug(gpu) or 'unknown-gpu'}_trt{release}.cache"


def import_tensorrt():
    """``tensorrt`` and its major version, or TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({e}); install it on a machine with an NVIDIA GPU "
            "(pip install 'cign-edge[trt]'; on a Jetson JetPack's own, seen through a virtual environment made "
            "with --system-site-packages) or build on the device with trtexec.sh"
        ) from e
    return trt, int(trt.__version__.split(".")[0])


def _recording_logger(trt):
    """A TensorRT logger that keeps the errors (the reason a factory returned null) and forwards warnings."""

    class Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return Recorder()


def _create(what: str, factory, *args, logger, version: str):
    """``factory(*args)`` or TensorRTUnavailable with TensorRT's logged errors. A null from a constructor
    (``trt.Builder``, ``trt.OnnxParser``) reaches Python as pybind11's TypeError, from a method as None."""
    try:
        made = factory(*args)
        detail = ""
    except TypeError as e:
        made, detail = None, str(e)
    if made is None:
        reason = "; ".join(logger.errors) or detail or "TensorRT logged no error"
        raise TensorRTUnavailable(f"TensorRT {version} could not create {what} ({reason}): is a CUDA GPU usable "
                                  "here, with a driver for this TensorRT's CUDA? Else build on the device with "
                                  "trtexec.sh")
    return made


def _attach_timing_cache(config, cache_path: Path):
    """Attach ``cache_path``'s timing cache, or a fresh one when it is absent or was made for another GPU or
    TensorRT (said in a warning); None (and a warning) when TensorRT cannot make one."""
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.warning("%s: timing cache of another GPU or TensorRT version; starting a fresh one", cache_path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT could not attach a new timing cache; building without one")
        return None
    return cache


def _save_timing_cache(config, cache_path: Path) -> None:
    """Write the builder's timing cache after a build; a failure is a warning (the engine is already written)."""
    attached = config.get_timing_cache()
    blob = attached.serialize() if attached is not None else None
    if blob is None:
        log.warning("no timing cache to save to %s", cache_path)
        return
    try:
        cache_path.write_bytes(bytes(blob))
    except OSError as e:
        log.warning("timing cache not saved: %s", e)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, profile: Profile, cache_dir: Path) -> Path:
    """Parse ``onnx_path``, build a serialized engine of ``precision`` and write it, then the timing cache of
    this GPU and TensorRT version into ``cache_dir`` (:func:`timing_cache_name`)."""
    trt, major = import_tensorrt()
    if major < MIN_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; this exporter targets TensorRT 10 and 11")
    logger = _recording_logger(trt)
    made = dict(logger=logger, version=trt.__version__)
    builder = _create("a builder", trt.Builder, logger, **made)
    network = _create("a network", builder.create_network, 0, **made)  # explicit batch only; 11: strongly typed
    parser = _create("an ONNX parser", trt.OnnxParser, network, logger, **made)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = _create("a builder config", builder.create_builder_config, **made)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in builder_flags(precision, major):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    opt = _create("an optimisation profile", builder.create_optimization_profile, **made)
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache_path = Path(cache_dir) / timing_cache_name(device_name(), trt.__version__)
    cache = _attach_timing_cache(config, cache_path)  # kept alive until the build is done
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.errors)
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build a {precision} engine from {onnx_path}"
                           + (f": {errors}" if errors else ""))
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        _save_timing_cache(config, cache_path)
    return engine_path
