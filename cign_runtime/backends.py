"""Inference backends of the live runtime: onnxruntime (CPU, CUDA or TensorRT execution provider),
native TensorRT engines and PyTorch on the export's source checkpoint, behind one :class:`Model`
opened from an export folder.

``open_model(dir, backend="auto")`` loads the manifest (every artefact's sha256 verified), picks a
backend (auto: a built TensorRT engine > ort-trt > ort-cuda > torch-cuda > ort-cpu, falling back
when one cannot start here and recording why in ``Model.reason``), a precision and, for
tokens-as-input exports, one task's token table. Torch-free; ``tensorrt`` and ``cuda-python`` are
imported only by the ``trt`` backend, and the ``torch-*`` backends' runner comes from the package
registered under the ``cign_runtime.runners`` entry point (``cign_export.torch_backend`` in the
training install), loaded only when one is opened.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from typing import Callable, Protocol

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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


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


def _cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise BackendUnavailable(f"trt: cuda-python is not installed ({e}); pip install cuda-python") from e
    return runtime


def gpu_count() -> int:
    """CUDA devices the driver API sees (``libcuda``, also on Jetson), 0 without driver or GPU; no toolkit needed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    n = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


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


def available(manifest: mf.Manifest) -> list[str]:
    """Backends that can run this export here, best first.

    ``ort-*``: onnxruntime lists the provider (onnxruntime-gpu lists CUDA/TensorRT even without a
    GPU; opening such a backend then fails with the reason). ``trt``: ``tensorrt`` importable, a
    built engine in the manifest and a CUDA GPU. ``torch-*``: torch and the runner installed
    (torch-cuda: and a CUDA GPU); opening one fails with the reason when the source checkpoint is missing.
    """
    providers = set(ort.get_available_providers())
    gpus = gpu_count()
    torch_here = ["torch-cuda"] * (gpus > 0) + ["torch-cpu"] if _torch_entry_point() else []
    here = [b for b in AUTO_ORDER if (b in PROVIDERS and PROVIDERS[b] in providers) or b in torch_here]
    if manifest.precisions("engine") and importlib.util.find_spec("tensorrt") is not None and gpus > 0:
        here.insert(0, "trt")
    return here + ["torch-cpu"] * ("torch-cpu" in torch_here)


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


class OrtRunner:
    """One onnxruntime session on the execution provider of an ``ort-*`` backend."""

    def __init__(self, path: Path, backend: str, precision: str, threads: int | None, cache_dir: Path,
                 spinning: bool = True):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:  # idle pool threads sleep instead of spinning after each parallel section
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cuda = ("CUDAExecutionProvider", {"device_id": 0})
        providers = {
            "ort-cpu": ["CPUExecutionProvider"],
            "ort-cuda": [cuda, "CPUExecutionProvider"],
            "ort-trt": [("TensorrtExecutionProvider", {
                "device_id": 0,
                "trt_fp16_enable": precision == "fp16",
                "trt_int8_enable": precision == "int8-trt",  # explicit Q/DQ scales, no calibration table
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
            }), cuda, "CPUExecutionProvider"],
        }[backend]
        if backend == "ort-trt":
            cache_dir.mkdir(parents=True, exist_ok=True)
        wanted = PROVIDERS[backend]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types differ between releases
            if backend == "ort-cpu":
                raise
            raise BackendUnavailable(f"{backend}: onnxruntime could not start {wanted}: {e}") from e
        if self.session.get_providers()[0] != wanted:  # onnxruntime falls back to CPU with a warning only
            raise BackendUnavailable(f"{backend}: onnxruntime could not start {wanted} (session runs on "
                                     f"{self.session.get_providers()}); check the CUDA / TensorRT libraries")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


class TensorRTRunner:
    """A serialized TensorRT 10/11 engine run with ``execute_async_v3`` on its own CUDA stream.

    Device buffers (cuda-python) grow to the largest batch seen; batches beyond the engine's
    optimisation profile are split into chunks of its maximum batch.
    """

    def __init__(self, plan: Path):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable(f"trt: TensorRT is not installed ({e})") from e
        self.trt, self.cudart = trt, _cudart()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"trt: TensorRT {trt.__version__} could not deserialize {plan} (engines are "
                                     "specific to GPU and TensorRT version: rebuild it here with trtexec.sh)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = sorted({mf.FRAME, mf.SPECTROGRAM, *mf.OUTPUTS} - set(names))
        if missing:
            raise ValueError(f"{plan}: engine lacks tensors {missing} (has {names})")
        self.max_batch = int(self.engine.get_tensor_profile_shape(mf.FRAME, 0)[2][0])
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)

    def _check(self, result: tuple):
        """cuda-python returns (error, *values): raise on an error, else the value (if any)."""
        err, *values = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {self.cudart.cudaGetErrorName(err)[1]!r}")
        return values[0] if values else None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
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
        if not self.context.execute_async_v3(int(self.stream)):
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
        n = len(feeds[mf.FRAME])
        parts = [self._run_batch({k: v if k == mf.TOKENS else v[s : s + self.max_batch] for k, v in feeds.items()})
                 for s in range(0, n, self.max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in mf.OUTPUTS}

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self._check(self.cudart.cudaFree(ptr))
        self.buffers = {}
        self._check(self.cudart.cudaStreamDestroy(self.stream))


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
    return OrtRunner(root / artefact.path, backend, precision, threads, cache, spinning)


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
    ValueError; a backend that cannot run here raises BackendUnavailable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    root = Path(export_dir)
    manifest = mf.Manifest.load(root)
    here = available(manifest)
    if mode is not None and backend not in (*TORCH_BACKENDS, "auto"):
        raise ValueError(f"mode {mode!r}: only the torch backends {TORCH_BACKENDS} take a mode, not {backend!r}")
    if backend != "auto" and backend not in here:
        raise BackendUnavailable(f"backend {backend!r} is not available here; available: {here}")
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
            reason = f"auto picked {b}, the best backend that runs here (available: {here}"
            reason += f"; skipped {'; '.join(skipped)})" if skipped else ")"
        else:
            reason = f"{b} as requested"
        if b in TORCH_BACKENDS:
            reason += f" ({runner.mode} mode)"
        return Model(root, manifest, b, p, task, tokens, runner, "; ".join([reason, *notes]),
                     functools.partial(_runner, backend=b, precision=p, threads=threads, cache_dir=cache_dir,
                                       spinning=spinning, mode=mode))
    raise BackendUnavailable(f"auto: no backend could run {root} here (available: {here}; tried: {'; '.join(skipped)})")
