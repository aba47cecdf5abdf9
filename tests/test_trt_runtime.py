"""The TensorRT side of the runtime without a GPU: the shape range the manifest records and onnxruntime's
TensorRT provider is given, why a backend is not available (driver, cuda-python, tensorrt), auto's fallback and
explicit refusals, idempotent close() and empty batches.

TensorRTRunner's own code runs here against a stand-in environment written by :func:`standin`: a
``libcuda.so.1`` compiled from C (driver API: version, one device), and ``tensorrt`` / ``cuda.bindings``
packages with the calls the runner makes, failing as ``$FAKE_TRT_FAIL`` says and logging every CUDA allocation
and free. Only the environment is stood in for; the runner, ``available`` and ``open_model`` are the real ones.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cign_export.exporter import Exporter, ExportOptions
from cign_runtime import backends
from cign_runtime import manifest as mf
from cign_runtime.backends import BackendUnavailable, open_model

NO_GPU_HERE = backends.gpu_count() == 0 and "TensorrtExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """Task 1 (10 classes, 5 in task 0) exported in fp32 with baked tokens and with tokens as input."""
    root = tmp_path_factory.mktemp("trt-runtime")
    quick = dict(parity_samples=10, calibration_per_class=2)
    Exporter(tiny_run, 1, root / "baked", ExportOptions(**quick))()
    Exporter(tiny_run, 1, root / "tokens", ExportOptions(tokens_as_input=True, **quick))()
    return {"baked": root / "baked", "tokens": root / "tokens"}


def with_engine(export: Path, dest: Path, precision: str = "fp32") -> Path:
    """A copy of ``export`` listing ``model_{precision}.plan``, whose bytes are no engine, as registered."""
    copy = shutil.copytree(export, dest)
    plan = copy / f"model_{precision}.plan"
    plan.write_bytes(b"not a serialized TensorRT engine")
    mf.Manifest.load(copy).with_engine(copy, plan, precision).save(copy)
    return copy


# ------------------------------------------------------------------------------------------ the shape range
def test_the_export_records_its_shape_range_and_it_round_trips(exports, tiny_run):
    for name, k_input in (("baked", None), ("tokens", [[5, 32], [10, 32], [10, 32]])):
        manifest = mf.Manifest.load(exports[name])
        expected = {mf.FRAME: [[1, 3, 64, 64], [1, 3, 64, 64], [8, 3, 64, 64]],
                    mf.SPECTROGRAM: [[1, 1, 32, 301], [1, 1, 32, 301], [8, 1, 32, 301]]}
        if k_input:
            expected[mf.TOKENS] = k_input
        assert manifest.profile == expected and manifest.shape_profile() == expected
        assert mf.Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    profile = Exporter(tiny_run, 1, exports["tokens"], ExportOptions(tokens_as_input=True)).profile()
    assert {n: [list(s) for s in shapes] for n, shapes in profile.shapes.items()} == manifest.profile


def test_a_manifest_without_a_profile_loads_and_derives_the_default_range(exports, tmp_path):
    copy = shutil.copytree(exports["tokens"], tmp_path / "old")
    data = json.loads((copy / mf.FILENAME).read_text())
    del data["profile"]
    (copy / mf.FILENAME).write_text(json.dumps(data))
    manifest = mf.Manifest.load(copy)
    assert manifest.profile is None
    assert manifest.shape_profile() == {mf.FRAME: [[1, 3, 64, 64], [1, 3, 64, 64], [8, 3, 64, 64]],
                                        mf.SPECTROGRAM: [[1, 1, 32, 301], [1, 1, 32, 301], [8, 1, 32, 301]],
                                        mf.TOKENS: [[5, 32], [10, 32], [10, 32]]}
    assert open_model(copy, "ort-cpu").backend == "ort-cpu"
    data["profile"] = {mf.FRAME: [[1, 3, 64, 64], [8, 3, 64, 64]]}  # no opt shape
    (copy / mf.FILENAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"profile of 'frame' is not \[min, opt, max\] shapes"):
        mf.Manifest.load(copy)


def test_a_version_with_an_enrolled_class_widens_the_class_range(exports):
    manifest = mf.Manifest.load(exports["tokens"])
    enrolled = dataclasses.replace(manifest, task=2, classes=[*manifest.classes, "dog"],
                                   classes_per_task=[*manifest.classes_per_task, 1])
    assert enrolled.shape_profile()[mf.TOKENS] == [[5, 32], [10, 32], [11, 32]]
    assert enrolled.shape_profile()[mf.FRAME] == manifest.profile[mf.FRAME]


# ------------------------------------------------------------------------------------ onnxruntime's TensorRT
def test_ort_trt_options_carry_the_shape_range_cache_and_precision_flags(exports, tiny_run, tmp_path):
    manifest = mf.Manifest.load(exports["tokens"])
    options = backends.ort_trt_options("fp16", tmp_path, manifest.shape_profile())
    assert options["trt_profile_min_shapes"] == "frame:1x3x64x64,spectrogram:1x1x32x301,tokens:5x32"
    assert options["trt_profile_opt_shapes"] == "frame:1x3x64x64,spectrogram:1x1x32x301,tokens:10x32"
    assert options["trt_profile_max_shapes"] == "frame:8x3x64x64,spectrogram:8x1x32x301,tokens:10x32"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_timing_cache_enable"] and options["trt_timing_cache_path"] == str(tmp_path)
    # the trtexec lines of the same export give TensorRT the same range
    flags = Exporter(tiny_run, 1, exports["tokens"], ExportOptions(tokens_as_input=True)).profile().trtexec_flags()
    assert flags == [f"--{k}Shapes={options[f'trt_profile_{k}_shapes']}" for k in ("min", "opt", "max")]
    flags = {p: {k: backends.ort_trt_options(p, tmp_path, manifest.shape_profile())[f"trt_{k}_enable"]
                 for k in ("fp16", "int8")} for p in ("fp32", "fp16", "int8-trt")}
    assert flags == {"fp32": {"fp16": False, "int8": False}, "fp16": {"fp16": True, "int8": False},
                     "int8-trt": {"fp16": True, "int8": True}}  # int8-trt: the float layers in FP16


@pytest.mark.skipif(not NO_GPU_HERE, reason="a GPU or onnxruntime's TensorRT provider is here")
def test_ort_trt_here_is_a_backend_unavailable_naming_why(exports, monkeypatch, tmp_path):
    refused = (r"backend 'ort-trt' is not available here; available: \['ort-cpu'.*\]; "
               r"ort-trt: not available: onnxruntime .* lists no TensorrtExecutionProvider")
    with pytest.raises(BackendUnavailable, match=refused):
        open_model(exports["tokens"], "ort-trt", cache_dir=tmp_path)
    # listed but unable to start (onnxruntime-gpu without a GPU): the session, given the shape range, is refused
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackendUnavailable, match="ort-trt: onnxruntime could not start TensorrtExecutionProvider"):
            open_model(exports["tokens"], "ort-trt", cache_dir=tmp_path)


# --------------------------------------------------------------------------- why trt is not available here
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_auto_falls_back_from_a_listed_engine_that_cannot_run_here_and_says_why(exports, tmp_path):
    copy = with_engine(exports["baked"], tmp_path / "copy")
    why = backends.unavailable(mf.Manifest.load(copy))["trt"]
    assert "tensorrt not importable (ModuleNotFoundError: No module named 'tensorrt')" in why
    with open_model(copy) as model:
        assert model.backend != "trt"
        assert f"not available: trt: {why}" in model.reason
    with pytest.raises(BackendUnavailable, match=r"backend 'trt' is not available here; available: .*; "
                                                 r"trt: not available: .*tensorrt not importable"):
        open_model(copy, "trt")
    assert "lists no TensorRT engine" in backends.unavailable(mf.Manifest.load(exports["baked"]))["trt"]


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory):
    """Build ``libcuda.so.1`` (driver API: cuDriverGetVersion from $FAKE_CUDA_DRIVER, default 12020; one device);
    returns its folder, for LD_LIBRARY_PATH."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the stand-in libcuda")
    out = tmp_path_factory.mktemp("libcuda")
    source = out / "libcuda.c"
    source.write_text(textwrap.dedent("""
        #include <stdlib.h>
        int cuDriverGetVersion(int *v) {
            const char *s = getenv("FAKE_CUDA_DRIVER");
            *v = s ? atoi(s) : 12020;
            return 0;
        }
        int cuInit(unsigned int flags) { return 0; }
        int cuDeviceGetCount(int *n) { *n = 1; return 0; }
        int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_UNKNOWN"; return 0; }
    """))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out / "libcuda.so.1"), str(source)], check=True)
    return out


def run_python(script: str, env: dict, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dist_info(root: Path, name: str, version: str) -> None:
    """An installed distribution's metadata, as pip leaves it (what ``importlib.metadata.version`` reads)."""
    folder = root / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_packages_built_for_a_newer_cuda_than_the_driver_are_named_with_the_pip_line(exports, tmp_path, fake_libcuda,
                                                                                      torchless_env):
    """cuda-python 13 and tensorrt-cu13 installed on a driver that reports CUDA 12.2 (a JetPack 6 board)."""
    copy = with_engine(exports["baked"], tmp_path / "copy")
    dist_info(tmp_path / "site", "cuda-bindings", "13.0.2")
    dist_info(tmp_path / "site", "tensorrt-cu13", "10.13.3")
    env = {**torchless_env, "LD_LIBRARY_PATH": str(fake_libcuda), "FAKE_CUDA_DRIVER": "12020",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), torchless_env["PYTHONPATH"]])}
    got = run_python(textwrap.dedent("""
        import json, sys
        from cign_runtime import backends, manifest as mf
        print(json.dumps({"gpus": backends.gpu_count(), "driver": backends.cuda_driver().version,
                          "trt": backends.unavailable(mf.Manifest.load(sys.argv[1]))["trt"]}))
    """), env, str(copy))
    assert got["gpus"] == 1 and got["driver"] == [12, 2]
    assert ("cuda-python 13.0.2 needs a CUDA 13 driver; this one reports CUDA 12.2: pip install 'cuda-python>=12,<13'"
            in got["trt"])
    assert ("tensorrt-cu13 10.13.3 needs a CUDA 13 driver; this one reports CUDA 12.2: pip install 'tensorrt-cu12>=10'"
            in got["trt"])
    assert "cudaGetDeviceCount" not in got["trt"]  # cuda-python is not run on a driver it cannot use


# ------------------------------------------------------------------ TensorRTRunner in a stand-in environment
STANDIN = {
    "tensorrt/__init__.py": '''
        """Stand-in for NVIDIA's tensorrt: a 10-class engine (batch 1-8); $FAKE_TRT_FAIL picks a failure."""
        import os
        import numpy as np

        __version__ = "10.3.0"
        NAMES = ["frame", "spectrogram", "p_audio", "p_visual", "p_av"]


        def fail():
            return os.environ.get("FAKE_TRT_FAIL", "")


        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass


        class TensorIOMode:
            INPUT, OUTPUT = "input", "output"


        def nptype(dtype):
            return np.float32


        class Runtime:
            def __init__(self, logger):
                if fail() == "pybind":  # what pybind11 raises when the C++ factory returns null
                    raise TypeError("pybind11::init(): factory function returned nullptr")

            def deserialize_cuda_engine(self, data):
                return None if fail() == "deserialize" else Engine()


        class Engine:
            def __init__(self):
                self.names = NAMES[:-1] if fail() == "tensors" else NAMES
                self.num_io_tensors = len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return TensorIOMode.INPUT if name in ("frame", "spectrogram") else TensorIOMode.OUTPUT

            def get_tensor_profile_shape(self, name, profile):
                return [(1, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 64)]

            def get_tensor_shape(self, name):
                return (-1, 10)

            def get_tensor_dtype(self, name):
                return "float"

            def create_execution_context(self):
                return None if fail() == "context" else Context()


        class Context:
            executed = []  # the stream handle of every execute_async_v3

            def set_input_shape(self, name, shape):
                self.batch = shape[0]
                return True

            def set_tensor_address(self, name, ptr):
                pass

            def get_tensor_shape(self, name):
                return (self.batch, 10)

            def execute_async_v3(self, stream_handle):
                Context.executed.append(stream_handle)
                return True
    ''',
    "cuda/__init__.py": "",
    "cuda/bindings/__init__.py": "",
    "cuda/bindings/runtime.py": '''
        """Stand-in for cuda.bindings.runtime: every allocation and free goes to $FAKE_CUDA_LOG."""
        import enum
        import json
        import os


        class cudaError_t(enum.IntEnum):
            cudaSuccess = 0
            cudaErrorInsufficientDriver = 35


        class cudaMemcpyKind(enum.IntEnum):
            cudaMemcpyHostToDevice = 1
            cudaMemcpyDeviceToHost = 2


        class cudaStream_t:
            """No __int__: the address only through cuda.bindings.utils.get_cuda_native_handle."""

            def __init__(self, address):
                self.address = address


        _next = [0x10000]
        OK = (cudaError_t.cudaSuccess,)


        def log(call, value):
            with open(os.environ["FAKE_CUDA_LOG"], "a") as f:
                f.write(json.dumps([call, value]) + "\\n")


        def cudaGetErrorName(err):
            return cudaError_t.cudaSuccess, cudaError_t(err).name.encode()


        def cudaGetDeviceCount():
            return cudaError_t.cudaSuccess, 1


        def cudaStreamCreate():
            if os.environ.get("FAKE_TRT_FAIL") == "stream":
                return cudaError_t.cudaErrorInsufficientDriver, None
            log("cudaStreamCreate", 0xBEEF)
            return cudaError_t.cudaSuccess, cudaStream_t(0xBEEF)


        def cudaStreamDestroy(stream):
            log("cudaStreamDestroy", stream.address)
            return OK


        def cudaStreamSynchronize(stream):
            return OK


        def cudaMalloc(nbytes):
            _next[0] += nbytes
            log("cudaMalloc", _next[0])
            return cudaError_t.cudaSuccess, _next[0]


        def cudaFree(ptr):
            log("cudaFree", ptr)
            return OK


        def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
            return OK
    ''',
    "cuda/bindings/utils.py": '''
        from cuda.bindings.runtime import cudaStream_t


        def get_cuda_native_handle(obj):
            if not isinstance(obj, cudaStream_t):
                raise TypeError(f"Unknown type: {type(obj)}")
            return obj.address
    ''',
}

OPEN = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from cign_runtime.backends import BackendUnavailable, open_model

    root, mode = sys.argv[1], sys.argv[2]
    os.environ["FAKE_TRT_FAIL"] = mode
    out = {}
    with open_model(root) as auto:
        out["auto"] = [auto.backend, auto.reason]
    try:
        model = open_model(root, "trt")
    except BackendUnavailable as e:
        out["explicit"] = str(e)
    else:
        from tensorrt import Context

        spec = model.spec
        out["explicit"], out["handle"], out["runs"] = model.backend, model.runner.stream_handle, []
        for n in (0, 2, 10):
            got = model.predict(np.zeros((n, 3, spec.frame_size, spec.frame_size), np.float32),
                                np.zeros((n, 1, spec.n_freq, spec.n_time), np.float32))
            out["runs"].append([n, {k: list(v.shape) for k, v in got.items()}, list(Context.executed)])
        model.close()
        out["log_after_close"] = open(os.environ["FAKE_CUDA_LOG"]).read().splitlines()
        model.close()
        out["log_after_second_close"] = open(os.environ["FAKE_CUDA_LOG"]).read().splitlines()
    print(json.dumps(out))
""")


@pytest.fixture
def standin(exports, tmp_path, fake_libcuda, torchless_env):
    """(export listing an engine, environment) where tensorrt, cuda-python 12 and a one-GPU CUDA 12.2 driver are."""
    for path, text in STANDIN.items():
        (tmp_path / "standin" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "standin" / path).write_text(textwrap.dedent(text))
    dist_info(tmp_path / "standin", "cuda-bindings", "12.9.1")
    env = {**torchless_env, "LD_LIBRARY_PATH": str(fake_libcuda), "FAKE_CUDA_LOG": str(tmp_path / "cuda.log"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "standin"), torchless_env["PYTHONPATH"]])}
    (tmp_path / "cuda.log").touch()
    return with_engine(exports["baked"], tmp_path / "export"), env


FAILURES = {  # $FAKE_TRT_FAIL -> what the refusal says
    "deserialize": "trt: TensorRT 10.3.0 could not deserialize",
    "context": "trt: TensorRT 10.3.0 could not create an execution context",
    "pybind": "TypeError: pybind11::init(): factory function returned nullptr",
    "stream": "RuntimeError: CUDA error cudaErrorInsufficientDriver",
    "tensors": "engine lacks tensors ['p_av']",
}


@pytest.mark.parametrize("mode", sorted(FAILURES))
def test_a_trt_runner_that_cannot_start_is_an_auto_fallback_and_an_explicit_refusal(standin, mode):
    export, env = standin
    got = run_python(OPEN, env, str(export), mode)
    backend, reason = got["auto"]
    assert backend == "ort-cpu" and "skipped trt: " in reason and FAILURES[mode] in reason
    assert got["explicit"].startswith("trt: ") and FAILURES[mode] in got["explicit"]


def test_trt_runner_runs_empty_batches_chunks_and_frees_everything_once(standin):
    export, env = standin
    got = run_python(OPEN, env, str(export), "")
    assert got["auto"][0] == "trt" and got["explicit"] == "trt"
    assert got["handle"] == 0xBEEF  # the stream's address, from cuda.bindings.utils.get_cuda_native_handle
    shapes = {name: [0, 10] for name in mf.OUTPUTS}
    assert got["runs"][0] == [0, shapes, []]  # batch 0: outputs without an engine call
    assert got["runs"][1] == [2, {name: [2, 10] for name in mf.OUTPUTS}, [0xBEEF]]
    assert got["runs"][2] == [10, {name: [10, 10] for name in mf.OUTPUTS}, [0xBEEF] * 3]  # 8 + 2
    calls = [json.loads(line) for line in got["log_after_close"]]
    allocated = [v for c, v in calls if c == "cudaMalloc"]
    freed = [v for c, v in calls if c == "cudaFree"]
    streams = [c for c, _ in calls if c.startswith("cudaStream")]
    assert allocated and sorted(freed) == sorted(allocated)  # every buffer freed once, the outgrown ones included
    assert streams.count("cudaStreamCreate") == 2 and streams.count("cudaStreamDestroy") == 2  # auto's and this one
    assert got["log_after_second_close"] == got["log_after_close"]  # a second close does nothing


# ------------------------------------------------------------------------------------------- empty batches
def test_ort_cpu_answers_an_empty_batch_with_empty_outputs_and_closes_twice(exports, torchless_env):
    """onnxruntime's CPU kernels die with SIGFPE on a batch of 0, so this runs in a process of its own."""
    got = run_python(textwrap.dedent("""
        import json, sys
        import numpy as np
        from cign_runtime.backends import open_model
        out = {}
        for root in sys.argv[1:]:
            model = open_model(root, "ort-cpu", task=0 if root.endswith("tokens") else None)
            spec = model.spec
            got = model.predict(np.zeros((0, 3, spec.frame_size, spec.frame_size), np.float32),
                                np.zeros((0, 1, spec.n_freq, spec.n_time), np.float32))
            out[root] = {k: [list(v.shape), str(v.dtype)] for k, v in got.items()}
            model.close()
            model.close()
        print(json.dumps(out))
    """), torchless_env, str(exports["baked"]), str(exports["tokens"]))
    assert got[str(exports["baked"])] == {name: [[0, 10], "float32"] for name in mf.OUTPUTS}
    assert got[str(exports["tokens"])] == {name: [[0, 5], "float32"] for name in mf.OUTPUTS}  # task 0's table


def test_torch_cpu_answers_an_empty_batch_without_running_the_model_and_closes_twice(exports):
    model = open_model(exports["baked"], "torch-cpu")
    calls = []
    forward = model.runner.forward
    model.runner.forward = lambda *args: calls.append(len(args[0])) or forward(*args)
    spec = model.spec
    for n in (0, 1):
        got = model.predict(np.zeros((n, 3, spec.frame_size, spec.frame_size), np.float32),
                            np.zeros((n, 1, spec.n_freq, spec.n_time), np.float32))
        assert {k: v.shape for k, v in got.items()} == {name: (n, 10) for name in mf.OUTPUTS}
    assert calls == [1]  # the batch of 1 only
    model.close()
    model.close()
