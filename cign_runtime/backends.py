"""Inference backends of the live runtime: onnxruntime (CPU, CUDA or TensorRT execution provider),
native TensorRT engines and PyTorch on the export's source checkpoint, behind one :class:`Model`
opened from an export folder.

``open_model(dir, backend="auto")`` loads the manifest (every artefact's sha256 verified), picks a
backend (auto: a built TensorRT engine > ort-trt > ort-cuda > torch-cuda > ort-cpu, falling back
when one cannot start here and recording why in ``Model.reason``), a precision and, for
tokens-as-input exports, one task's token table. :func:`unavailable` says why each other backend
cannot run here (no engine, TensorRT not importable, cuda-python built for a newer CUDA than the
driver's, ...). Torch-free; ``tensorrt`` and ``cuda-python`` are imported only by the ``trt``
backend, and the ``torch-*`` backends' runner comes from the package registered under the
``cign_runtime.runners`` entry point (``cign_export.torch_backend`` in the training install), loaded
only when one is opened.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import onnxruntime as ort

from cign_runtime import isa
from cign_runtime import manifest as mf
from cign_runtime.spec import PreprocessSpec

#: The ``--backend`` choices.
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch-cuda", "torch-cpu")
#: Preference of ``auto``, best first (torch-cpu, for parity checks, only when asked for).
AUTO_ORDER = ("trt", "ort-trt", "ort-cuda", "torch-cuda", "ort-cpu")
#: PyTorch on the export's source checkpoint (``cign_export.torch_backend``).
TORCH_BACKENDS = ("torch-cuda", "torch-cpu")
#: Precisions of the torch backends: the checkpoint's weights cast when it is opened, no artefact each.
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
#: Execution modes of the torch backends (``MODE[:torch.compile mode]``; ``cign_export.torch_backend``).
TORCH_MODES = ("eager", "graph", "compile", "compile-graph")
#: Default mode per torch backend.
DEFAULT_MODES = {"torch-cuda": "graph", "torch-cpu": "eager"}
#: Entry-point group (name ``torch``) of the runner class the torch backends open.
RUNNER_GROUP = "cign_runtime.runners"
#: The onnxruntime execution provider each ``ort-*`` backend needs.
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}
#: Default precision per backend: the first of these the export has.
DEFAULT_PRECISIONS = {"ort-cpu": ("int8-cpu", "fp32"), "ort-cuda": ("fp16", "fp32"),
                      "ort-trt": ("fp16", "fp32"), "trt": ("fp16", "fp32"), "torch-cuda": ("fp16",),
                      "torch-cpu": ("fp32",)}


#: x86 flags whose integer dot products accumulate in int32. Without them (AVX2 and pre-VNNI AVX-512
#: CPUs) onnxruntime's u8 x s8 kernels add pairs of products in a saturating int16, so int8-cpu
#: weights must stay within [-64, 64] (``calibration.quantize``).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def saturates_here(onnx_path: Path) -> str | None:
    """Why the int8-cpu graph at ``onnx_path`` would lose accuracy on this CPU, or None when it will not:
    an x86 CPU with AVX2 but no VNNI, and int8 weights beyond 7 bits (exports made before 2026-11-27)."""
    flags = isa.cpu_flags()
    if "avx2" not in flags or flags & VNNI_FLAGS:
        return None
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(i) for i in onnx.load(str(onnx_path), load_external_data=False).graph.initializer
               if i.data_type == onnx.TensorProto.INT8]
    widest = max((int(np.abs(w.astype(np.int16)).max()) for w in weights if w.size), default=0)
    if widest <= 64:
        return None
    return (f"{onnx_path}: its int8 weights use 8 bits (|w| up to {widest}) and this CPU has no VNNI, where "
            f"onnxruntime's u8 x s8 kernels saturate and lose accuracy; export it again "
            f"(cign-export --int8 --target cpu writes 7-bit weights)")


class Runner(Protocol):
    """What a backend runs: graph feeds (``manifest.feed`` + tokens) -> the outputs, float32 (N, K) each."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Protocol method (no body): the outputs of one batch of feeds, (0, K) for an empty batch."""

    def close(self) -> None:
        """Protocol method (no body): release the session, engine or model; a second call does nothing."""


class BackendUnavailable(ValueError):
    """A backend cannot run here; the message names it and lists the backends that can."""


def role(backend: str) -> str:
    """What a backend runs: ``engine`` for native TensorRT, ``checkpoint`` (the manifest's source checkpoint)
    for the torch backends, else the ``onnx`` artefacts."""
    return "engine" if backend == "trt" else "checkpoint" if backend in TORCH_BACKENDS else "onnx"


def precisions(manifest: mf.Manifest, backend: str) -> list[str]:
    """The precisions ``backend`` can run this export at."""
    return list(TORCH_PRECISIONS) if backend in TORCH_BACKENDS else manifest.precisions(role(backend))


def source_sha256(manifest: mf.Manifest, backend: str, precision: str) -> str:
    """The sha256 of what ``backend`` runs at ``precision``: its artefact's, or the source checkpoint's."""
    if backend in TORCH_BACKENDS:
        return manifest.checkpoint["sha256"]
    return manifest.artefact(role(backend), precision).sha256


def cache_root() -> Path:
    """Where onnxruntime's TensorRT engine and timing caches go (outside the hashed export folder)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cign" / "ort-trt"


class Driver(NamedTuple):
    """What the CUDA driver API (``libcuda``) reports: GPUs, its CUDA version (major, minor), why no GPU."""

    gpus: int
    version: tuple[int, int] | None
    problem: str | None


def cuda_driver() -> Driver:
    """Ask ``libcuda.so.1`` (also on Jetson; no toolkit needed) for its CUDA version (``cuDriverGetVersion``,
    which needs no ``cuInit``) and its devices."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return Driver(0, None, f"no CUDA driver ({e})")
    raw, n = ctypes.c_int(0), ctypes.c_int(0)  # cuDriverGetVersion: 1000 * major + 10 * minor
    known = cuda.cuDriverGetVersion(ctypes.byref(raw)) == 0 and raw.value > 0
    version = (raw.value // 1000, raw.value % 1000 // 10) if known else None
    call, code = "cuInit", cuda.cuInit(0)
    if code == 0:
        call, code = "cuDeviceGetCount", cuda.cuDeviceGetCount(ctypes.byref(n))
    if code != 0:
        name = ctypes.c_char_p()
        named = cuda.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value
        text = name.value.decode() if named else f"error {code}"
        return Driver(0, version, f"the CUDA driver{_cuda_text(version)} fails {call}: {text}")
    return Driver(n.value, version, None if n.value else f"the CUDA driver{_cuda_text(version)} sees no GPU")


def _cuda_text(version: tuple[int, int] | None) -> str:
    return f" (CUDA {version[0]}.{version[1]})" if version else ""


def gpu_count() -> int:
    """CUDA devices the driver API sees, 0 without driver or GPU (:func:`cuda_driver`)."""
    return cuda_driver().gpus


def cuda_python_version() -> str | None:
    """The installed cuda-python bindings' version (``cuda-bindings``, or ``cuda-python`` before 12.6)."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _pin(driver: Driver) -> str:
    """The pip line of the cuda-python series this driver runs."""
    major = driver.version[0] if driver.version else None
    return f"pip install 'cuda-python>={major},<{major + 1}'" if major else "pip install cuda-python"


def cuda_mismatches(driver: Driver) -> list[str]:
    """Installed packages built for a newer CUDA major than the driver's, which they cannot run on, with the
    pip line of the right build: cuda-python (its major is the CUDA major) and TensorRT's ``tensorrt-cuNN``."""
    if driver.version is None:
        return []
    have, reports = driver.version[0], f"this one reports CUDA {driver.version[0]}.{driver.version[1]}"
    found = []
    version = cuda_python_version()
    if version is not None and int(version.split(".")[0]) > have:
        found.append(f"cuda-python {version} needs a CUDA {version.split('.')[0]} driver; {reports}: {_pin(driver)}")
    for newer in range(have + 1, have + 4):
        try:
            trt_version = importlib.metadata.version(f"tensorrt-cu{newer}")
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(f"tensorrt-cu{newer} {trt_version} needs a CUDA {newer} driver; {reports}: "
                     f"pip install 'tensorrt-cu{have}>=10'")
    return found


def _cudart(driver: Driver | None = None):
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6), else
    BackendUnavailable with the pip line for this driver."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise BackendUnavailable(f"trt: cuda-python is not importable ({e}); "
                                     f"{_pin(driver or cuda_driver())}") from e
    return runtime


def _error_name(cudart, err) -> str:
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def _trt_problems(manifest: mf.Manifest, driver: Driver) -> list[str]:
    """Why the ``trt`` backend cannot run this export here: no engine listed, no driver or GPU, ``tensorrt``
    not importable, packages built for a newer CUDA than the driver's, cuda-python missing or failing to
    reach the GPU."""
    if not manifest.precisions("engine"):
        return ["this export lists no TensorRT engine (build one here with its trtexec.sh, then "
                "cign-live --register-engine)"]
    problems = [driver.problem] if driver.problem else []
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        problems.append(f"tensorrt not importable ({type(e).__name__}: {e}); pip install 'cign-edge[trt]' "
                        "(on a Jetson: JetPack's python3-libnvinfer)")
    mismatches = cuda_mismatches(driver)
    problems += mismatches
    try:
        cudart = _cudart(driver)
    except BackendUnavailable as e:
        return problems + [str(e).removeprefix("trt: ")]
    if driver.gpus and not mismatches:
        err, _ = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            problems.append(f"cuda-python {cuda_python_version()} cannot reach the GPU: cudaGetDeviceCount gives "
                            f"{_error_name(cudart, err)} (the driver{_cuda_text(driver.version)})")
    return problems


def _torch_entry_point() -> importlib.metadata.EntryPoint | None:
    """The torch backends' runner entry point when it and torch are installed (nothing imported)."""
    found = importlib.metadata.entry_points(group=RUNNER_GROUP, name="torch")
    return next(iter(found)) if found and importlib.util.find_spec("torch") is not None else None


def torch_runner():
    """The runner class of the torch backends (entry point ``torch`` of ``RUNNER_GROUP``), or BackendUnavailable."""
    entry = _torch_entry_point()
    try:
        if entry is not None:
            return entry.load()
        why = "not installed"
    except ImportError as e:
        why = str(e)
    raise BackendUnavailable(f"torch-*: PyTorch and the training install are not here ({why}; pip install "
                             "'cign-edge[train]', or JetPack's torch wheel and then cign-edge)")


def survey(manifest: mf.Manifest) -> tuple[list[str], dict[str, str]]:
    """(:func:`available`, :func:`unavailable`) from one look at this machine."""
    providers = ort.get_available_providers()
    driver = cuda_driver()
    absent: dict[str, str] = {}
    for b, provider in PROVIDERS.items():
        if provider not in providers:
            absent[b] = (f"onnxruntime {ort.__version__} lists no {provider} (a CPU build? pip install "
                         "onnxruntime-gpu, on a Jetson its JetPack's wheel)")
    if _torch_entry_point() is None:
        try:
            torch_runner()
        except BackendUnavailable as e:
            absent["torch-cpu"] = absent["torch-cuda"] = str(e).removeprefix("torch-*: ")
    elif driver.problem:
        absent["torch-cuda"] = driver.problem
    trt = _trt_problems(manifest, driver)
    if trt:
        absent["trt"] = "; ".join(trt)
    here = [b for b in (*AUTO_ORDER, "torch-cpu") if b not in absent]
    return here, absent


def available(manifest: mf.Manifest) -> list[str]:
    """Backends that can run this export here, best first (``torch-cpu``, never auto's choice, last).

    ``ort-*``: onnxruntime lists the provider (onnxruntime-gpu lists CUDA/TensorRT even without a
    GPU; opening such a backend then fails with the reason). ``trt``: a built engine in the manifest,
    a CUDA GPU, ``tensorrt`` importable and cuda-python reaching the GPU. ``torch-*``: torch and the
    runner installed (torch-cuda: and a CUDA GPU); opening one fails with the reason when the source
    checkpoint is missing.
    """
    return survey(manifest)[0]


def unavailable(manifest: mf.Manifest) -> dict[str, str]:
    """{backend: why it cannot run this export here} for each backend :func:`available` leaves out."""
    return survey(manifest)[1]


def pick_precision(manifest: mf.Manifest, backend: str, precision: str | None) -> str:
    """``precision`` if ``backend`` has it for this export (else ValueError listing what it has), or the default."""
    have = precisions(manifest, backend)
    if precision is not None:
        if precision not in have:
            raise ValueError(f"precision {precision!r} is not in this export for {backend} "
                             f"({role(backend)} precisions: {have})")
        return precision
    for p in DEFAULT_PRECISIONS[backend]:
        if p in have:
            return p
    raise ValueError(f"{backend}: this export has none of {DEFAULT_PRECISIONS[backend]} "
                     f"({role(backend)} precisions exported: {have}); pass a precision")


def empty_outputs(feeds: dict[str, np.ndarray], classes: int | None) -> dict[str, np.ndarray]:
    """What a batch of 0 gives: (0, K) float32 per output, K from the token table fed or the graph's ``classes``."""
    k = len(feeds[mf.TOKENS]) if mf.TOKENS in feeds else classes
    if k is None:
        raise ValueError("a batch of 0 on a graph whose class count is not fixed needs its token table")
    return {name: np.zeros((0, k), np.float32) for name in mf.OUTPUTS}


def profile_text(profile: dict[str, list[list[int]]], bound: int) -> str:
    """One bound (0 min, 1 opt, 2 max) of a shape profile as trtexec and onnxruntime write it:
    ``frame:1x3x64x64,spectrogram:1x1x32x301``."""
    return ",".join(f"{name}:{'x'.join(map(str, shapes[bound]))}" for name, shapes in profile.items())


def ort_trt_options(precision: str, cache_dir: Path, profile: dict[str, list[list[int]]]) -> dict:
    """TensorrtExecutionProvider's options for a graph of ``precision`` with the export's shape range.

    ``profile`` ({input: [min, opt, max]}, ``Manifest.shape_profile``) goes in as the explicit
    ``trt_profile_min/opt/max_shapes``, so the engine onnxruntime builds and caches in ``cache_dir`` (with
    its timing cache) covers every batch and class count of the range; without them it builds for the
    first shapes it sees and rebuilds whenever a larger batch or token table comes, minutes on a Jetson in
    the middle of a stream. A shape beyond the range still makes it widen the range and rebuild.

    int8-trt runs the Q/DQ graph's own scales (no calibration table) with FP16 enabled as well, so the
    layers outside Q/DQ pairs (attention products, softmax, normalisation, sigmoid) run in FP16, the mixed
    precision of the TensorRT 10 engines (``cign_export.engine.builder_flags``); with INT8 alone they run
    in FP32.
    """
    options = {
        "device_id": 0,
        "trt_fp16_enable": precision in ("fp16", "int8-trt"),
        "trt_int8_enable": precision == "int8-trt",
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
    }
    for bound, kind in enumerate(("min", "opt", "max")):
        options[f"trt_profile_{kind}_shapes"] = profile_text(profile, bound)
    return options


class OrtRunner:
    """One onnxruntime session on the execution provider of an ``ort-*`` backend (``profile``: the export's
    shape range, which ort-trt needs; :func:`ort_trt_options`)."""

    def __init__(self, path: Path, backend: str, precision: str, threads: int | None, cache_dir: Path,
                 spinning: bool = True, profile: dict[str, list[list[int]]] | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:  # idle pool threads sleep instead of spinning after each parallel section
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cuda = ("CUDAExecutionProvider", {"device_id": 0})
        providers: list = ["CPUExecutionProvider"]
        if backend in ("ort-cuda", "ort-trt"):
            providers.insert(0, cuda)
        if backend == "ort-trt":
            if profile is None:
                raise ValueError("ort-trt needs the export's shape profile (Manifest.shape_profile)")
            providers.insert(0, ("TensorrtExecutionProvider", ort_trt_options(precision, cache_dir, profile)))
            cache_dir.mkdir(parents=True, exist_ok=True)
        wanted = PROVIDERS[backend]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers,
                                                disabled_optimizers=list(mf.DISABLED_OPTIMIZERS.get(precision, ())))
        except Exception as e:  # onnxruntime's own exception types differ between releases
            if backend == "ort-cpu":
                raise
            raise BackendUnavailable(f"{backend}: onnxruntime could not start {wanted}: {e}") from e
        if self.session.get_providers()[0] != wanted:  # onnxruntime falls back to CPU with a warning only
            raise BackendUnavailable(f"{backend}: onnxruntime could not start {wanted} (session runs on "
                                     f"{self.session.get_providers()}); check the CUDA / TensorRT libraries")
        k = self.session.get_outputs()[0].shape[-1]
        self.classes = k if isinstance(k, int) else None  # None: K comes with the token table

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(feeds[mf.FRAME]) == 0:  # onnxruntime's CPU kernels die with SIGFPE on an empty batch
            return empty_outputs(feeds, self.classes)
        return dict(zip(mf.OUTPUTS, self.session.run(list(mf.OUTPUTS), feeds)))

    def split_times(self, feeds: dict[str, np.ndarray]) -> dict[str, float]:
        """One call on a GPU provider timed in trtexec's three parts (ms): inputs copied to the GPU
        (``OrtValue`` on cuda), the graph run on GPU-resident inputs and outputs (IO binding,
        synchronised), outputs copied back."""
        if self.session.get_providers()[0] == "CPUExecutionProvider":
            raise ValueError("split_times needs a GPU execution provider")
        t0 = time.perf_counter()
        values = {name: ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for name, array in feeds.items()}
        t1 = time.perf_counter()
        binding = self.session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name in mf.OUTPUTS:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        t2 = time.perf_counter()
        binding.copy_outputs_to_cpu()
        t3 = time.perf_counter()
        return {"h2d_ms": (t1 - t0) * 1e3, "compute_ms": (t2 - t1) * 1e3, "d2h_ms": (t3 - t2) * 1e3}

    def close(self) -> None:
        self.session = None


def _stream_handle(stream) -> int:
    """The address of a cuda-python stream, as ``execute_async_v3`` takes it: ``get_cuda_native_handle``
    (cuda-bindings 12.9.1 and 13, which deprecate ``int()`` on CUDA objects), ``int()`` before it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return get_cuda_native_handle(stream)


class TensorRTRunner:
    """A serialized TensorRT 10/11 engine run with ``execute_async_v3`` on its own CUDA stream.

    Device buffers (cuda-python) grow to the largest batch seen; batches beyond the engine's
    optimisation profile are split into chunks of its maximum batch. Whatever keeps it from starting
    (TensorRT or cuda-python missing or failing, an engine TensorRT cannot load, a TensorRT factory
    returning null) is BackendUnavailable naming the cause, with what was allocated freed.
    """

    def __init__(self, plan: Path):
        self.cudart = self.stream = self.context = self.engine = self.runtime = None
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable(f"trt: TensorRT is not installed ({e})") from e
        self.trt, self.cudart = trt, _cudart()
        try:
            self._open(Path(plan))
        except Exception as e:  # RuntimeError from CUDA, TypeError from pybind on a null object, ...
            self._release()
            if isinstance(e, BackendUnavailable):
                raise
            why = "; ".join(cuda_mismatches(cuda_driver()))
            raise BackendUnavailable(f"trt: {plan}: {type(e).__name__}: {e}" + (f" ({why})" if why else "")) from e

    def _open(self, plan: Path) -> None:
        trt = self.trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"trt: TensorRT {trt.__version__} could not deserialize {plan} (engines are "
                                     "specific to GPU and TensorRT version: rebuild it here with trtexec.sh)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"trt: TensorRT {trt.__version__} could not create an execution context for "
                                     f"{plan} (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = sorted({mf.FRAME, mf.SPECTROGRAM, *mf.OUTPUTS} - set(names))
        if missing:
            raise BackendUnavailable(f"trt: {plan}: engine lacks tensors {missing} (has {names})")
        self.max_batch = int(self.engine.get_tensor_profile_shape(mf.FRAME, 0)[2][0])
        k = int(self.engine.get_tensor_shape(mf.OUTPUTS[0])[-1])
        self.classes = k if k >= 0 else None  # None: K comes with the token table
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self.stream_handle = _stream_handle(self.stream)

    def _check(self, result: tuple):
        """cuda-python returns (error, *values): raise on an error, else the value (if any)."""
        err, *values = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {_error_name(self.cudart, err)}")
        return values[0] if values else None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                del self.buffers[name]  # not freed twice if the next allocation fails
                self._check(self.cudart.cudaFree(ptr))
            ptr, size = int(self._check(self.cudart.cudaMalloc(nbytes))), nbytes
            self.buffers[name] = (ptr, size)
            self.context.set_tensor_address(name, ptr)
        return ptr

    def _run_batch(self, feeds: dict[str, np.ndarray], marks: list[float] | None = None) -> dict[str, np.ndarray]:
        """One batch within the profile; ``marks`` collects a synchronised time after each stage (split_times)."""
        def mark():
            if marks is not None:
                self._check(self.cudart.cudaStreamSynchronize(self.stream))
                marks.append(time.perf_counter())

        mark()
        h2d, d2h = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            host = feeds[name]
            if not self.context.set_input_shape(name, host.shape):
                raise ValueError(f"trt: input {name} of shape {host.shape} is outside the engine's profile")
            ptr = self._buffer(name, host.nbytes)
            self._check(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream))
        outputs = {name: np.empty(tuple(self.context.get_tensor_shape(name)),
                                  dtype=self.trt.nptype(self.engine.get_tensor_dtype(name))) for name in mf.OUTPUTS}
        for name, host in outputs.items():
            self._buffer(name, host.nbytes)
        mark()
        if not self.context.execute_async_v3(self.stream_handle):
            raise RuntimeError("trt: execute_async_v3 failed")
        mark()
        for name, host in outputs.items():
            ptr = self.buffers[name][0]
            self._check(self.cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self.stream))
        self._check(self.cudart.cudaStreamSynchronize(self.stream))
        mark()
        return outputs

    def split_times(self, feeds: dict[str, np.ndarray]) -> dict[str, float]:
        """One batch timed in trtexec's three parts (ms): host-to-device copies, the engine's
        ``execute_async_v3``, device-to-host copies, each ended by a stream synchronisation."""
        if len(feeds[mf.FRAME]) > self.max_batch:
            raise ValueError(f"split_times times one batch of at most {self.max_batch}")
        marks: list[float] = []
        self._run_batch(feeds, marks)
        t0, t1, t2, t3 = marks
        return {"h2d_ms": (t1 - t0) * 1e3, "compute_ms": (t2 - t1) * 1e3, "d2h_ms": (t3 - t2) * 1e3}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.context is None:
            raise ValueError("trt: this runner is closed")
        n = len(feeds[mf.FRAME])
        if n == 0:
            return empty_outputs(feeds, self.classes)
        parts = [self._run_batch({k: v if k == mf.TOKENS else v[s : s + self.max_batch] for k, v in feeds.items()})
                 for s in range(0, n, self.max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in mf.OUTPUTS}

    def _release(self) -> list[str]:
        """Drop the context, engine and runtime (in that order), free the buffers and the stream; the CUDA
        errors met. Everything is let go even when a free fails, so a second call has nothing to do."""
        buffers, stream, self.buffers, self.stream = self.buffers, self.stream, {}, None
        self.context = self.engine = self.runtime = None
        calls = [("cudaFree", ptr) for ptr, _ in buffers.values()]
        if stream is not None:
            calls.append(("cudaStreamDestroy", stream))
        errors = []
        for name, arg in calls:
            err = getattr(self.cudart, name)(arg)[0]
            if err != self.cudart.cudaError_t.cudaSuccess:
                errors.append(f"{name}: {_error_name(self.cudart, err)}")
        return errors

    def close(self) -> None:
        """Free the device memory and the stream; a second call does nothing. RuntimeError naming the frees
        that failed."""
        errors = self._release()
        if errors:
            raise RuntimeError("trt: " + "; ".join(errors))

    def __del__(self) -> None:
        self._release()  # a runner dropped without close(); errors have no one to go to here


class Model:
    """An opened export: ``predict(frame, spectrogram)`` -> {p_audio, p_visual, p_av} (N, K) on one backend.

    ``opener(root, manifest)`` opens this backend and precision's runner on another version (:meth:`version`)."""

    def __init__(self, root: Path, manifest: mf.Manifest, backend: str, precision: str, task: int,
                 tokens: np.ndarray | None, runner: Runner, reason: str,
                 opener: Callable[[Path, mf.Manifest], Runner]):
        self.root, self.manifest, self.backend, self.precision, self.task = root, manifest, backend, precision, task
        self.tokens, self.runner, self.reason, self.opener = tokens, runner, reason, opener
        self.classes = manifest.classes[: manifest.n_classes(task)]

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.spec

    @property
    def confidence(self) -> mf.Confidence:
        return self.manifest.confidence

    def predict(self, frame: np.ndarray, spectrogram: np.ndarray) -> dict[str, np.ndarray]:
        """frame (N, 3, H, W) and spectrogram (N, 1, F, T) as ``manifest.feed`` makes them -> outputs (N, K)."""
        feeds = {mf.FRAME: np.ascontiguousarray(frame, dtype=np.float32),
                 mf.SPECTROGRAM: np.ascontiguousarray(spectrogram, dtype=np.float32)}
        if self.tokens is not None:
            feeds[mf.TOKENS] = self.tokens
        return self.runner.run(feeds)

    def version(self, root: Path, manifest: mf.Manifest, task: int | None = None) -> "Model":
        """This backend and precision on another version of a tokens-as-input export (``manifest``, verified, of
        ``root``), with the table of ``task`` (default: that version's newest).

        The running session is shared when that version's graph for this precision has the same sha256 (an
        enrolled version's graphs are hard links of its parent's); else a new runner opens. ValueError naming
        ``root`` when the version cannot take this model's place."""
        if self.tokens is None or not manifest.tokens_as_input:
            raise ValueError(f"{root}: the class tokens are baked into its graph; only tokens-as-input versions "
                             "replace a running tokens-as-input model")
        if manifest.spec != self.spec:
            raise ValueError(f"{root}: its preprocessing spec differs from the running export's; restart cign-live "
                             "with it as --model")
        if self.precision not in precisions(manifest, self.backend):
            kind = role(self.backend)
            raise ValueError(f"{root}: no {self.precision} {kind} artefact, which the running {self.backend} model "
                             f"runs (it has {kind} precisions {manifest.precisions(kind)})")
        task, tokens = _tokens(root, manifest, task)
        same = (source_sha256(manifest, self.backend, self.precision)
                == source_sha256(self.manifest, self.backend, self.precision))
        runner = self.runner if same else self.opener(root, manifest)
        return Model(root, manifest, self.backend, self.precision, task, tokens, runner, self.reason, self.opener)

    def close(self) -> None:
        """Close the runner (every runner's close may be called again)."""
        self.runner.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return (f"{self.root}: {self.backend} {self.precision}, task {self.task} ({len(self.classes)} classes); "
                f"{self.reason}")


def _tokens(root: Path, manifest: mf.Manifest, task: int | None) -> tuple[int, np.ndarray | None]:
    """The task and, for tokens-as-input exports, its token table (ValueError listing the tables there are)."""
    if not manifest.tokens_as_input:
        if task not in (None, manifest.task):
            raise ValueError(f"{root}: the classes of task {manifest.task} are baked into this export's graph; "
                             f"task {task} needs a tokens-as-input export (cign-export --tokens-as-input)")
        return manifest.task, None
    task = manifest.task if task is None else task
    tables = sorted(a.task for a in manifest.artefacts if a.role == "tokens")
    if task not in tables:
        raise ValueError(f"{root}: no token table of task {task}; this export has tables of tasks {tables}")
    table = np.load(root / manifest.artefact("tokens", task=task).path)
    return task, np.ascontiguousarray(table, dtype=np.float32)


def _runner(root: Path, manifest: mf.Manifest, backend: str, precision: str, threads: int | None,
            cache_dir: Path | None, spinning: bool, mode: str | None = None) -> Runner:
    if backend in TORCH_BACKENDS:
        return torch_runner()(root, manifest, backend, precision, mode or DEFAULT_MODES[backend], threads)
    artefact = manifest.artefact(role(backend), precision)
    if backend == "trt":
        return TensorRTRunner(root / artefact.path)
    cache = Path(cache_dir or cache_root()) / artefact.sha256[:16]
    profile = manifest.shape_profile() if backend == "ort-trt" else None
    return OrtRunner(root / artefact.path, backend, precision, threads, cache, spinning, profile)


def open_model(export_dir: str | os.PathLike, backend: str = "auto", precision: str | None = None,
               task: int | None = None, threads: int | None = None,
               cache_dir: str | os.PathLike | None = None, spinning: bool = True, mode: str | None = None) -> Model:
    """Open an export folder on ``backend`` (one of BACKENDS).

    ``precision``: one the export has (default per backend: int8-cpu else fp32 on ort-cpu, fp32 when
    the int8-cpu graph would saturate on this CPU (:func:`saturates_here`; asked for, it raises
    ValueError); fp16 else fp32 on GPUs; the torch backends: fp32, fp16 or bf16, default fp16 on CUDA).
    ``task``: whose token table a tokens-as-input export runs (default: the manifest's). ``threads``:
    onnxruntime intra-op threads (torch's on torch-cpu). ``mode``: the torch backends' execution mode
    (``TORCH_MODES``; default ``DEFAULT_MODES``; with ``auto``, used when it picks one). ``spinning=False``: its idle threads sleep
    rather than spin (``cign-live`` runs one inference per hop; see ``cign_runtime.live``).
    ``cache_dir``: root of onnxruntime's TensorRT engine cache (default ``cache_root()``). A tampered export raises the manifest's
    ValueError; a backend that cannot run here raises BackendUnavailable with the reason (:func:`unavailable`,
    or the runner's failure). ``auto`` goes on to the next backend instead, and ``Model.reason`` says why each
    better one was skipped or is not available.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    root = Path(export_dir)
    manifest = mf.Manifest.load(root)
    here, absent = survey(manifest)
    if mode is not None and backend not in (*TORCH_BACKENDS, "auto"):
        raise ValueError(f"mode {mode!r}: only the torch backends {TORCH_BACKENDS} take a mode, not {backend!r}")
    if backend != "auto" and backend not in here:
        raise BackendUnavailable(f"backend {backend!r} is not available here; available: {here}; "
                                 f"{backend}: not available: {absent[backend]}")
    candidates = [b for b in here if b in AUTO_ORDER] if backend == "auto" else [backend]
    if precision is not None and not any(precision in precisions(manifest, b) for b in candidates):
        if backend != "auto":
            raise ValueError(f"precision {precision!r}: {backend} runs {precisions(manifest, backend)} of this export")
        raise ValueError(f"precision {precision!r} is not in this export (onnx: {manifest.precisions('onnx')}, "
                         f"engines: {manifest.precisions('engine')}) for the backends auto picks from here {candidates}")
    task, tokens = _tokens(root, manifest, task)
    skipped: list[str] = []
    notes: list[str] = []
    for b in candidates:
        if backend == "auto" and precision is not None and precision not in precisions(manifest, b):
            skipped.append(f"{b}: no {precision} {role(b)}")
            continue
        p = pick_precision(manifest, b, precision)
        if b == "ort-cpu" and p == "int8-cpu":
            why = saturates_here(root / manifest.artefact("onnx", p).path)
            if why and (precision is not None or "fp32" not in manifest.precisions("onnx")):
                raise ValueError(why)
            if why:
                notes.append(f"fp32, not int8-cpu: {why}")
                p = "fp32"
        try:
            runner = _runner(root, manifest, b, p, threads, cache_dir, spinning, mode)
        except BackendUnavailable as e:
            if backend != "auto":
                raise
            skipped.append(str(e))
            continue
        if backend == "auto":
            better = [f"{a}: {absent[a]}" for a in AUTO_ORDER[: AUTO_ORDER.index(b)] if a in absent]
            parts = [f"available: {here}"]
            if skipped:
                parts.append(f"skipped {'; '.join(skipped)}")
            if better:
                parts.append(f"not available: {'; '.join(better)}")
            reason = f"auto picked {b}, the best backend that runs here ({'; '.join(parts)})"
        else:
            reason = f"{b} as requested"
        if b in TORCH_BACKENDS:
            reason += f" ({runner.mode} mode)"
        return Model(root, manifest, b, p, task, tokens, runner, "; ".join([reason, *notes]),
                     functools.partial(_runner, backend=b, precision=p, threads=threads, cache_dir=cache_dir,
                                       spinning=spinning, mode=mode))
    gone = "; ".join(f"{a}: {why}" for a, why in absent.items())
    raise BackendUnavailable(f"auto: no backend could run {root} here (available: {here}; tried: {'; '.join(skipped)}; "
                             f"not available: {gone})")
