"""trtexec.sh run by sh against a stand-in trtexec (on PATH, through TRTEXEC, at JetPack's path), and the
engine builder's logic against a stand-in ``tensorrt`` module that keeps the API's documented contract
(``set_timing_cache`` returns False for another device's cache; a null from a constructor is pybind11's
TypeError). No TensorRT needed; the real-TensorRT check skips without it."""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cign_export import engine
from cign_export.graph import input_infos
from cign_runtime.spec import get_preset

SH = shutil.which("dash") or shutil.which("sh")  # JetPack's /bin/sh is dash
TOOLS = ("dirname", "sed", "head", "tr")  # all trtexec.sh needs besides the shell's builtins
PRECISIONS = ["fp32", "fp16", "int8-trt"]
ONNX = {p: f"model_{p}.onnx" for p in PRECISIONS}
H100 = "NVIDIA H100 80GB HBM3"


def profile(tokens_as_input: bool = False) -> engine.Profile:
    return engine.Profile.for_inputs(input_infos(get_preset("cpu"), 32, tokens_as_input), 8, (5, 10, 10))


def write_script(folder: Path, precisions=PRECISIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ONNX.values():
        (folder / name).write_bytes(b"onnx")
    script = folder / "trtexec.sh"
    script.write_text(engine.trtexec_script(ONNX, precisions, profile()))
    return script


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def standin(path: Path, log: Path, code: int | None) -> Path:
    """A trtexec that appends its arguments to ``log``, prints trtexec's banner for version ``code``
    (e.g. 100300 = 10.3.0; None: no banner) and writes an empty ``--saveEngine`` file."""
    banner = f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] # trtexec $*"' if code else "echo usage"
    return executable(path, f"""#!/bin/sh
printf '%s\\n' "$*" >> '{log}'
{banner}
for a in "$@"; do case $a in --saveEngine=*) : > "${{a#--saveEngine=}}";; esac; done
""")


@pytest.fixture
def tools(tmp_path) -> Path:
    """A PATH folder with only the utilities trtexec.sh uses: no host trtexec, nvidia-smi or dpkg-query."""
    folder = tmp_path / "tools"
    folder.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), folder / tool)
    return folder


def run(script: Path, path: list[Path], **env) -> subprocess.CompletedProcess:
    return subprocess.run([SH, str(script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.pathsep.join(map(str, path)), **env})


def builds(log: Path) -> list[dict[str, str]]:
    """The recorded trtexec calls other than the version probe, each as {flag: value}."""
    calls = log.read_text().splitlines() if log.is_file() else []
    return [dict(arg.partition("=")[::2] for arg in call.split()) for call in calls if call != "--help"]


def flags(call: dict) -> set[str]:
    return {f for f in ("--fp16", "--int8", "--best", "--stronglyTyped") if f in call}


def fake_nvidia_smi(folder: Path, name: str) -> None:
    executable(folder / "nvidia-smi", f'#!/bin/sh\n[ "$1" = --query-gpu=name ] && echo "{name}"\n')


@functools.cache
def mount_namespace() -> str | None:
    """Why a private mount namespace (to put files at /usr/src/tensorrt/bin) is unavailable, or None."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None or not Path("/usr/src").is_dir():
        return "needs unshare(1), mount(8) and an existing /usr/src"
    done = subprocess.run([unshare, "-rm", SH, "-c", f"{mount} -t tmpfs tmpfs /usr/src"], capture_output=True,
                          text=True, timeout=30)
    return None if done.returncode == 0 else f"user and mount namespaces not permitted here: {done.stderr.strip()}"


def run_with_private_usr_src(script: Path, path: list[Path], jetpack_trtexec: Path | None) -> subprocess.CompletedProcess:
    """``run`` with an empty /usr/src of its own, holding ``jetpack_trtexec`` at JetPack's path if given."""
    setup = f"{shutil.which('mount')} -t tmpfs tmpfs /usr/src"
    if jetpack_trtexec is not None:
        setup += (f" && {shutil.which('mkdir')} -p /usr/src/tensorrt/bin"
                  f" && {shutil.which('cp')} {jetpack_trtexec} {engine.JETPACK_TRTEXEC}")
    return subprocess.run([shutil.which("unshare"), "-rm", SH, "-c", f'{setup} && exec {SH} "$0"', str(script)],
                          capture_output=True, text=True, timeout=60, env={"PATH": os.pathsep.join(map(str, path))})


def test_trtexec_on_path_with_tensorrt_10_builds_each_engine_with_its_flags_workspace_shapes_and_device_cache(
        tmp_path, tools):
    if engine.TEGRA_RELEASE.is_file():
        pytest.skip("a Jetson names its GPU by the board model, not nvidia-smi")
    script = write_script(tmp_path / "export")
    bin_ = tmp_path / "bin"
    standin(bin_ / "trtexec", tmp_path / "calls", 100300)
    fake_nvidia_smi(bin_, H100)
    done = run(script, [bin_, tools])
    assert done.returncode == 0, done.stderr
    calls = builds(tmp_path / "calls")
    assert [c["--saveEngine"] for c in calls] == ["model_fp32.plan", "model_fp16.plan", "model_int8-trt.plan"]
    by_engine = {c["--saveEngine"]: c for c in calls}
    # TensorRT 10: FP16 from the fp32 graph with --fp16; INT8 from the Q/DQ graph with FP16 for its float layers
    assert by_engine["model_fp16.plan"]["--onnx"] == "model_fp32.onnx" and flags(by_engine["model_fp16.plan"]) == {"--fp16"}
    assert by_engine["model_int8-trt.plan"]["--onnx"] == "model_int8-trt.onnx"
    assert flags(by_engine["model_int8-trt.plan"]) == {"--int8", "--fp16"}
    assert by_engine["model_fp32.plan"]["--onnx"] == "model_fp32.onnx" and flags(by_engine["model_fp32.plan"]) == set()
    shapes = dict(f.split("=", 1) for f in profile().trtexec_flags())
    cache = "timing_nvidia-h100-80gb-hbm3_trt10.3.0.cache"
    assert cache == engine.timing_cache_name(H100, "10.3.0.30")  # the Python builder names it the same
    for call in calls:
        assert call["--memPoolSize"] == f"workspace:{engine.WORKSPACE_BYTES // 2**20}"  # MiB, as the Python path
        assert {k: call[k] for k in shapes} == shapes
        assert call["--timingCacheFile"] == cache
    assert shapes["--maxShapes"] == "frame:8x3x64x64,spectrogram:8x1x32x301"
    assert all((tmp_path / "export" / c["--saveEngine"]).is_file() for c in calls)
    assert "TensorRT 10.3.0" in done.stdout and H100 in done.stdout


def test_trtexec_variable_wins_and_tensorrt_11_builds_each_engine_from_its_own_onnx_without_precision_flags(
        tmp_path, tools):
    script = write_script(tmp_path / "export")
    standin(tmp_path / "bin" / "trtexec", tmp_path / "path-calls", 100300)  # a TensorRT 10 trtexec on PATH
    chosen = standin(tmp_path / "opt" / "trt11" / "trtexec", tmp_path / "calls", 110100)
    done = run(script, [tmp_path / "bin", tools], TRTEXEC=str(chosen))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "path-calls").exists()
    calls = builds(tmp_path / "calls")
    assert [(c["--onnx"], c["--saveEngine"]) for c in calls] == [(ONNX[p], engine.engine_name(p)) for p in PRECISIONS]
    assert all(flags(c) == set() for c in calls)  # strongly typed: the graph's types decide
    assert {c["--timingCacheFile"] for c in calls} == {"timing_unknown-gpu_trt11.1.0.cache"}


@pytest.mark.parametrize("name", ["nowhere/trtexec", "not-executable", "no-such-command"])
def test_a_trtexec_variable_that_names_no_executable_is_refused(tmp_path, tools, name):
    script = write_script(tmp_path / "export")
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    value = name if name == "no-such-command" else str(tmp_path / name)
    done = run(script, [tools], TRTEXEC=value)
    assert done.returncode != 0 and f"TRTEXEC={value} is not an executable" in done.stderr


def test_jetpacks_trtexec_is_used_when_none_is_on_path(tmp_path, tools):
    script = write_script(tmp_path / "export")
    assert engine.JETPACK_TRTEXEC == "/usr/src/tensorrt/bin/trtexec"
    assert f"elif [ -x {engine.JETPACK_TRTEXEC} ]; then" in script.read_text()
    reason = mount_namespace()
    if reason:  # the probe above is all that can be checked without writing under /usr/src
        pytest.skip(f"running trtexec.sh against {engine.JETPACK_TRTEXEC} {reason}")
    fake = standin(tmp_path / "jetpack-trtexec", tmp_path / "calls", 100300)
    done = run_with_private_usr_src(script, [tools], fake)
    assert done.returncode == 0, done.stderr
    assert f"({engine.JETPACK_TRTEXEC})" in done.stdout
    assert [c["--saveEngine"] for c in builds(tmp_path / "calls")] == [engine.engine_name(p) for p in PRECISIONS]


def test_without_any_trtexec_the_script_fails_saying_where_it_looked(tmp_path, tools):
    script = write_script(tmp_path / "export")
    if Path(engine.JETPACK_TRTEXEC).exists():
        reason = mount_namespace()
        if reason:
            pytest.skip(f"{engine.JETPACK_TRTEXEC} exists on this machine, and hiding it {reason}")
        done = run_with_private_usr_src(script, [tools], None)
    else:
        done = run(script, [tools])
    assert done.returncode != 0
    assert "trtexec not found: not on PATH, not at /usr/src/tensorrt/bin/trtexec" in done.stderr
    assert "set TRTEXEC=" in done.stderr and "libnvinfer-bin" in done.stderr
    assert not list((tmp_path / "export").glob("*.plan"))


def test_tensorrt_8_is_refused_before_any_build(tmp_path, tools):
    """JetPack 5's TensorRT 8.5 prints [TensorRT v8502] (major*1000 + minor*100 + patch)."""
    script = write_script(tmp_path / "export")
    standin(tmp_path / "bin" / "trtexec", tmp_path / "calls", 8502)
    done = run(script, [tmp_path / "bin", tools])
    assert done.returncode != 0
    assert "TensorRT 8.5.2 found" in done.stderr and "need TensorRT 10 or newer" in done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["--help"] and builds(tmp_path / "calls") == []
    assert not list((tmp_path / "export").glob("*.plan"))


def test_without_a_banner_the_version_comes_from_dpkg(tmp_path, tools):
    script = write_script(tmp_path / "export")
    bin_ = tmp_path / "bin"
    standin(bin_ / "trtexec", tmp_path / "calls", None)
    executable(bin_ / "dpkg-query", '#!/bin/sh\nfor a; do [ "$a" = libnvinfer-bin ] && echo "10.3.0.30-1+cuda12.5"; done\n')
    done = run(script, [bin_, tools])
    assert done.returncode == 0, done.stderr
    calls = builds(tmp_path / "calls")
    assert flags(calls[1]) == {"--fp16"} and calls[1]["--onnx"] == "model_fp32.onnx"
    assert calls[0]["--timingCacheFile"] == "timing_unknown-gpu_trt10.3.0.cache"


def test_an_unknown_version_asks_for_trt_major_which_then_decides(tmp_path, tools):
    script = write_script(tmp_path / "export")
    standin(tmp_path / "bin" / "trtexec", tmp_path / "calls", None)
    done = run(script, [tmp_path / "bin", tools])
    assert done.returncode != 0 and "cannot tell the TensorRT version" in done.stderr and "set TRT_MAJOR" in done.stderr
    assert builds(tmp_path / "calls") == []
    done = run(script, [tmp_path / "bin", tools], TRT_MAJOR="11")
    assert done.returncode == 0, done.stderr
    calls = builds(tmp_path / "calls")
    assert calls[1]["--onnx"] == "model_fp16.onnx" and all(flags(c) == set() for c in calls)
    assert calls[0]["--timingCacheFile"] == "timing_unknown-gpu_trt11.cache"
    done = run(script, [tmp_path / "bin", tools], TRT_MAJOR="ten")
    assert done.returncode != 0 and "TRT_MAJOR=ten is not a number" in done.stderr


def test_a_real_exports_trtexec_sh_runs_with_its_token_profile_and_matches_the_report(tiny_run, tmp_path, tools):
    from cign_export.exporter import Exporter, ExportOptions

    out = tmp_path / "export"
    out.mkdir()
    exporter = Exporter(tiny_run, 1, out, ExportOptions(precisions=("fp32", "fp16", "int8-trt"), tokens_as_input=True))
    report: dict = {}
    artefact = exporter.write_trtexec(PRECISIONS, report)
    assert artefact.role == "trtexec" and os.access(out / "trtexec.sh", os.X_OK)
    text = (out / "trtexec.sh").read_text()
    assert all(line in text for v in (10, 11) for line in report["trtexec"][v])
    standin(tmp_path / "bin" / "trtexec", tmp_path / "calls", 100300)
    done = run(out / "trtexec.sh", [tmp_path / "bin", tools])
    assert done.returncode == 0, done.stderr
    calls = builds(tmp_path / "calls")
    assert len(calls) == 3
    for call in calls:  # K from the first task's classes to all of them
        assert call["--minShapes"].endswith(",tokens:5x32") and call["--maxShapes"].endswith(",tokens:10x32")
        assert call["--maxShapes"].startswith("frame:8x3x")


# ------------------------------------------------------------------- engine.py without TensorRT


def test_the_trt_extra_stays_on_the_cuda_12_builds():
    """pip's newest cuda-python and bare tensorrt are CUDA 13 builds, which a CUDA 12 driver (JetPack 6) cannot load."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trt"]
    pins = {r.name: r.specifier for r in map(Requirement, extra)}
    assert set(pins) == {"tensorrt-cu12", "cuda-python"}
    assert "12.9.10" in pins["cuda-python"] and "13.0.0" not in pins["cuda-python"]


def test_builder_flags_are_shared_by_both_paths():
    assert engine.builder_flags("fp32", 10) == [] and engine.builder_flags("fp16", 10) == ["FP16"]
    assert engine.builder_flags("int8-trt", 10) == ["INT8", "FP16"]
    assert all(engine.builder_flags(p, v) == [] for p in PRECISIONS for v in (11, 12))
    line = engine.trtexec_command(ONNX, "int8-trt", 10, profile(), "x.plan", cache="c.cache", exe="trtexec")
    assert line.startswith("trtexec --onnx=model_int8-trt.onnx --saveEngine=x.plan --int8 --fp16 --minShapes=")
    assert line.endswith(f"--memPoolSize=workspace:{engine.WORKSPACE_BYTES >> 20} --timingCacheFile=c.cache")
    assert [engine.onnx_source(p, 10) for p in PRECISIONS] == ["fp32", "fp32", "int8-trt"]
    assert [engine.onnx_source(p, 11) for p in PRECISIONS] == PRECISIONS


def test_timing_cache_names_carry_the_device_and_the_tensorrt_release():
    assert engine.timing_cache_name("NVIDIA Jetson AGX Orin Developer Kit", "10.3.0") == \
        "timing_nvidia-jetson-agx-orin-developer-kit_trt10.3.0.cache"
    assert engine.timing_cache_name(H100, "10.9.0.34") == "timing_nvidia-h100-80gb-hbm3_trt10.9.0.cache"
    assert engine.timing_cache_name("", "11.1.0") == "timing_unknown-gpu_trt11.1.0.cache"
    assert engine.timing_cache_name("Orin (nvgpu)", "10.3.0") != engine.timing_cache_name(H100, "10.3.0")


def test_device_name_is_the_jetson_board_model_else_nvidia_smis(tmp_path, monkeypatch):
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0")
    monkeypatch.setattr(engine, "TEGRA_RELEASE", release)
    monkeypatch.setattr(engine, "DEVICE_TREE_MODEL", model)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert engine.device_name() == ""  # neither a Jetson nor nvidia-smi
    fake_nvidia_smi(tmp_path / "bin", "Orin (nvgpu)")
    assert engine.device_name() == "Orin (nvgpu)"
    release.write_text("# R36 (release), REVISION: 4.0\n")
    assert engine.device_name() == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"


# ------------------------------------------------- build_engine against the documented API contract


def fake_tensorrt(version: str = "10.3.0", foreign_cache: bytes = b"", builder_error: str | None = None,
                  cache_serializes: bool = True, attaches: bool = True) -> types.ModuleType:
    """A ``tensorrt`` with the calls build_engine makes: ``set_timing_cache`` refuses ``foreign_cache``
    (another device's), or every cache unless ``attaches``, and attaches nothing then; a failing ``Builder``
    logs ``builder_error`` and raises pybind11's TypeError; every made config is kept in ``configs``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.configs = []

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Cache:
        def __init__(self, blob: bytes):
            self.blob = blob

        def serialize(self):
            return (self.blob or b"fresh") + b"+tuned" if cache_serializes else None

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles, self.cache = [], {}, [], None
            trt.configs.append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, opt):
            self.profiles.append(opt)

        def create_timing_cache(self, blob):
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            if ignore_mismatch or not attaches or cache.blob == foreign_cache != b"":
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class OptProfile(dict):
        def set_shape(self, name, lo, mid, hi):
            self[name] = (lo, mid, hi)

    class Builder:
        def __init__(self, logger):
            if builder_error:
                logger.log(ILogger.Severity.ERROR, builder_error)
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            return b"plan"

    class OnnxParser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    return trt


@pytest.fixture
def with_tensorrt(monkeypatch):
    def install(**kwargs) -> types.ModuleType:
        trt = fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engine, "device_name", lambda: H100)
        return trt
    return install


def build(tmp_path: Path, precision: str = "fp16") -> Path:
    return engine.build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", precision, profile(), tmp_path)


@pytest.mark.parametrize("version, precision, expected", [("10.3.0", "int8-trt", ["INT8", "FP16"]),
                                                          ("10.3.0", "fp16", ["FP16"]), ("11.1.0", "int8-trt", [])])
def test_the_builder_sets_the_shared_precision_flags_and_workspace(tmp_path, with_tensorrt, version, precision, expected):
    trt = with_tensorrt(version=version)
    build(tmp_path, precision)
    (config,) = trt.configs
    assert config.flags == expected and config.pools == {"WORKSPACE": engine.WORKSPACE_BYTES}
    assert set(config.profiles[0]) == {"frame", "spectrogram"}


def test_the_timing_cache_is_named_after_the_device_and_reused(tmp_path, with_tensorrt):
    with_tensorrt()
    build(tmp_path)
    cache = tmp_path / "timing_nvidia-h100-80gb-hbm3_trt10.3.0.cache"
    assert (tmp_path / "model.plan").read_bytes() == b"plan" and cache.read_bytes() == b"fresh+tuned"
    assert not (tmp_path / "timing.cache").exists()
    build(tmp_path)
    assert cache.read_bytes() == b"fresh+tuned+tuned"  # attached, then saved with this build's timings


def test_a_cache_from_another_device_is_replaced_by_a_fresh_one_and_said(tmp_path, with_tensorrt, caplog):
    cache = tmp_path / "timing_nvidia-h100-80gb-hbm3_trt10.3.0.cache"
    cache.write_bytes(b"another gpu")
    with_tensorrt(foreign_cache=b"another gpu")
    with caplog.at_level(logging.WARNING, "cign_export.tensorrt"):
        build(tmp_path)
    assert "timing cache of another GPU or TensorRT version; starting a fresh one" in caplog.text
    assert (tmp_path / "model.plan").read_bytes() == b"plan" and cache.read_bytes() == b"fresh+tuned"


def test_the_engine_is_kept_when_the_cache_cannot_be_saved(tmp_path, with_tensorrt, caplog):
    with_tensorrt(cache_serializes=False)
    with caplog.at_level(logging.WARNING, "cign_export.tensorrt"):
        assert build(tmp_path) == tmp_path / "model.plan"
    assert (tmp_path / "model.plan").read_bytes() == b"plan"
    assert "no timing cache to save" in caplog.text and not list(tmp_path.glob("*.cache"))


def test_without_an_attached_cache_the_engine_is_built_and_nothing_crashes_after_it(tmp_path, with_tensorrt, caplog):
    (tmp_path / "timing_nvidia-h100-80gb-hbm3_trt10.3.0.cache").write_bytes(b"another gpu")
    with_tensorrt(attaches=False)
    with caplog.at_level(logging.WARNING, "cign_export.tensorrt"):
        build(tmp_path)
    assert (tmp_path / "model.plan").read_bytes() == b"plan"
    assert "could not attach a new timing cache; building without one" in caplog.text


def test_a_null_builder_is_tensorrt_unavailable_with_tensorrts_reason(tmp_path, with_tensorrt):
    with_tensorrt(builder_error="CUDA initialization failure with error: 35")
    with pytest.raises(engine.TensorRTUnavailable, match=r"TensorRT 10.3.0 could not create a builder "
                                                         r"\(CUDA initialization failure with error: 35\)"):
        build(tmp_path)
    assert not (tmp_path / "model.plan").exists()


def test_tensorrt_8_is_refused(tmp_path, with_tensorrt):
    with_tensorrt(version="8.6.2")
    with pytest.raises(engine.TensorRTUnavailable, match="TensorRT 8.6.2 found; this exporter targets TensorRT 10 and 11"):
        build(tmp_path)


# ------------------------------------------------------------------------------ real TensorRT


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt is not installed (TensorRT needs NVIDIA's index and a GPU)")
def test_real_tensorrt_builds_and_caches_per_device(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT cannot build an engine")
    graph = helper.make_graph([helper.make_node("Relu", ["frame"], ["p"])], "g",
                              [helper.make_tensor_value_info("frame", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 3, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "model.onnx"))
    shapes = engine.Profile({"frame": ((1, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4))})
    import tensorrt as trt

    cache = tmp_path / engine.timing_cache_name(engine.device_name(), trt.__version__)
    cache.write_bytes(b"not a timing cache")  # a broken or foreign cache must not stop the build
    engine.build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", "fp16", shapes, tmp_path)
    assert (tmp_path / "model.plan").stat().st_size > 0 and cache.read_bytes() != b"not a timing cache"
