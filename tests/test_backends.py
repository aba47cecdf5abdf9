"""Runtime backends on real exports of the tiny trained run: backend and precision choice, parity with
plain onnxruntime, task tables, refusals, a torch-free import, and native TensorRT where a GPU is."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

from cign_export import parity
from cign_export.exporter import Exporter, ExportOptions
from cign_export.parity import load_samples, open_store
from cign_runtime import backends
from cign_runtime import manifest as mf
from cign_runtime.backends import BackendUnavailable, open_model
from cign_train.checkpoint import TaskCheckpoint

GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())
CUDA = backends.gpu_count() > 0  # torch-cuda is available (and auto's choice over ort-cpu) where torch is


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """Task 1 exported as fp32 + int8-cpu (baked tokens), and as fp32 tokens-as-input."""
    root = tmp_path_factory.mktemp("backend-exports")
    quick = dict(parity_samples=10, calibration_per_class=2)
    Exporter(tiny_run, 1, root / "int8", ExportOptions(precisions=("fp32", "int8-cpu"), **quick))()
    Exporter(tiny_run, 1, root / "tokens", ExportOptions(tokens_as_input=True, **quick))()
    return {"int8": root / "int8", "tokens": root / "tokens"}


@pytest.fixture(scope="module")
def samples(tiny_run):
    ckpt = TaskCheckpoint.load(tiny_run / "task_1.pt")
    return load_samples(open_store(ckpt.settings), ckpt.classes, "test")


def plain(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(mf.OUTPUTS, session.run(list(mf.OUTPUTS), feeds)))


@pytest.mark.parametrize("precision", ["fp32", "int8-cpu"])
def test_ort_cpu_matches_a_plain_onnxruntime_session_on_store_samples(exports, samples, precision):
    model = open_model(exports["int8"], "ort-cpu", precision=precision, threads=2)
    got = model.predict(samples.feeds[mf.FRAME], samples.feeds[mf.SPECTROGRAM])
    ref = plain(exports["int8"] / f"model_{precision}.onnx", samples.feeds)
    assert list(got) == list(mf.OUTPUTS)
    for name in mf.OUTPUTS:
        assert got[name].shape == (len(samples), 10)
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["p_av"], got["p_audio"] * got["p_visual"], rtol=1e-5, atol=1e-7)
    assert model.classes == model.manifest.classes and model.spec == model.manifest.spec
    assert model.confidence == model.manifest.confidence


@pytest.mark.skipif(bool(GPU_PROVIDERS) or CUDA, reason="a GPU is here: auto may pick a GPU backend")
def test_auto_picks_ort_cpu_here_and_says_why(exports):
    assert backends.available(mf.Manifest.load(exports["int8"])) == ["ort-cpu", "torch-cpu"]  # torch-cpu: asked for only
    model = open_model(exports["int8"])
    assert (model.backend, model.precision) == ("ort-cpu", "int8-cpu")
    assert "auto picked ort-cpu" in model.reason and "available: ['ort-cpu', 'torch-cpu']" in str(model)
    assert "ort-cpu as requested" in str(open_model(exports["int8"], "ort-cpu"))


def test_precision_defaults_explicit_choice_and_missing_one(exports):
    assert open_model(exports["int8"], "ort-cpu").precision == "int8-cpu"  # int8-cpu exported: the CPU default
    assert open_model(exports["tokens"], "ort-cpu").precision == "fp32"  # fp32 only
    assert open_model(exports["int8"], "ort-cpu", precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match=r"'fp16' is not in this export \(onnx: \['fp32', 'int8-cpu'\]"):
        open_model(exports["int8"], precision="fp16")
    with pytest.raises(ValueError, match=r"precision 'fp16': ort-cpu runs \['fp32', 'int8-cpu'\] of this export"):
        open_model(exports["int8"], "ort-cpu", precision="fp16")


@pytest.mark.skipif(bool(GPU_PROVIDERS) or CUDA, reason="a GPU is here")
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt", "trt", "torch-cuda"])
def test_a_backend_unavailable_here_errors_listing_the_available_ones(exports, backend):
    message = rf"backend '{backend}' is not available here; available: \['ort-cpu', 'torch-cpu'\]"
    with pytest.raises(BackendUnavailable, match=message):
        open_model(exports["int8"], backend)


@pytest.mark.skipif(bool(GPU_PROVIDERS) or CUDA, reason="a GPU is here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_listed_provider_that_cannot_start_is_an_error_or_an_auto_fallback(exports, monkeypatch):
    """onnxruntime-gpu lists CUDA without a GPU and its sessions then run on CPU: that is refused, not hidden."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"ort-cuda: onnxruntime could not start CUDAExecutionProvider"):
        open_model(exports["int8"], "ort-cuda")
    model = open_model(exports["int8"])
    assert model.backend == "ort-cpu"
    assert "available: ['ort-cuda', 'ort-cpu', 'torch-cpu']; skipped ort-cuda: onnxruntime could not start" in model.reason


def test_an_unknown_backend_lists_the_choices(exports):
    with pytest.raises(ValueError, match=r"'cuda' is not one of \('auto', 'ort-cpu', 'ort-cuda', 'ort-trt', 'trt', "
                                         r"'torch-cuda', 'torch-cpu'\)"):
        open_model(exports["int8"], "cuda")


def test_tokens_as_input_runs_each_task_table(exports, samples):
    manifest = mf.Manifest.load(exports["tokens"])
    for task, k in ((0, 5), (1, 10)):
        model = open_model(exports["tokens"], "ort-cpu", task=task)
        assert model.task == task and model.classes == manifest.classes[:k]
        got = model.predict(samples.feeds[mf.FRAME], samples.feeds[mf.SPECTROGRAM])
        table = np.load(exports["tokens"] / f"tokens_task{task}.npy")
        ref = plain(exports["tokens"] / "model_fp32.onnx", {**samples.feeds, mf.TOKENS: table})
        for name in mf.OUTPUTS:
            assert got[name].shape == (len(samples), k)
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
    assert open_model(exports["tokens"]).task == 1  # default: the manifest's task
    with pytest.raises(ValueError, match=r"no token table of task 7; this export has tables of tasks \[0, 1\]"):
        open_model(exports["tokens"], task=7)
    with pytest.raises(ValueError, match="task 0 needs a tokens-as-input export"):
        open_model(exports["int8"], task=0)


def test_a_tampered_artefact_is_refused_at_open(exports, tmp_path):
    copy = shutil.copytree(exports["tokens"], tmp_path / "copy")
    table = copy / "tokens_task0.npy"
    np.save(table, np.load(table) * 1.01)
    with pytest.raises(ValueError, match="tokens_task0.npy: sha256 differs"):
        open_model(copy)


def test_imports_and_runs_without_torch(exports, samples, tmp_path, torchless_env):
    np.savez(tmp_path / "feeds.npz", **samples.feeds)
    script = textwrap.dedent(f"""
        import numpy as np
        from cign_runtime.backends import open_model
        feeds = np.load({str(tmp_path / 'feeds.npz')!r})
        model = open_model({str(exports['int8'])!r}, "ort-cpu", precision="fp32")
        out = model.predict(feeds["frame"], feeds["spectrogram"])
        print(model.backend, out["p_av"].shape)
    """)
    env = torchless_env
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ort-cpu", f"({len(samples)},", "10)"]
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert "torch is blocked" in blocked.stderr  # the fake really shadows torch


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt is not installed (it needs NVIDIA's index and a GPU): native engines untested")
def test_native_tensorrt_engine_matches_onnxruntime(tiny_run, samples, tmp_path):
    if backends.gpu_count() == 0:
        pytest.skip("no CUDA GPU visible to cuda-python: TensorRT engines cannot run")
    out = tmp_path / "trt"
    result = Exporter(tiny_run, 1, out, ExportOptions(trt=True, parity_samples=10))()
    assert result.engine_error is None, result.engine_error
    with open_model(out) as model:
        assert (model.backend, model.precision) == ("trt", "fp32") and "auto picked trt" in model.reason
        got = model.predict(samples.feeds[mf.FRAME], samples.feeds[mf.SPECTROGRAM])
    ref = plain(out / "model_fp32.onnx", samples.feeds)
    for name in mf.OUTPUTS:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-3)


def test_an_engine_built_on_the_device_is_registered_with_its_hash(exports, tmp_path):
    """``Manifest.with_engine``: what ``cign-live --register-engine`` saves after TensorRT loaded the plan. The
    bytes here are not an engine (no TensorRT here); the manifest side is what is checked."""
    copy = shutil.copytree(exports["int8"], tmp_path / "copy")
    plan = copy / "model_fp16.plan"
    plan.write_bytes(b"engine bytes built by trtexec.sh")
    manifest = mf.Manifest.load(copy).with_engine(copy, plan, "fp16")
    manifest.save(copy)
    loaded = mf.Manifest.load(copy)
    assert loaded.precisions("engine") == ["fp16"] and loaded.artefact("engine", "fp16").sha256 == mf.sha256(plan)
    rebuilt = loaded.with_engine(copy, plan, "fp16")  # registering again replaces, never duplicates
    assert [a.path for a in rebuilt.artefacts].count("model_fp16.plan") == 1
    plan.write_bytes(b"another build")
    with pytest.raises(ValueError, match="model_fp16.plan: sha256 differs"):
        mf.Manifest.load(copy)
    with pytest.raises(ValueError, match="must lie inside the export folder"):
        loaded.with_engine(copy, shutil.copy(plan, tmp_path / "outside.plan"), "fp16")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_register_engine_without_tensorrt_is_a_clear_error_and_leaves_the_manifest(exports, tmp_path, torchless_env):
    copy = shutil.copytree(exports["int8"], tmp_path / "copy")
    (copy / "model_fp16.plan").write_bytes(b"not checked without TensorRT")
    before = (copy / mf.FILENAME).read_bytes()
    proc = subprocess.run([sys.executable, "-m", "cign_runtime.cli", "--model", str(copy), "--register-engine",
                           str(copy / "model_fp16.plan"), "--precision", "fp16"],
                          capture_output=True, text=True, timeout=120, env=torchless_env)
    assert proc.returncode == 1 and "trt: TensorRT is not installed" in proc.stderr
    assert (copy / mf.FILENAME).read_bytes() == before
    mf.Manifest.load(copy).with_engine(copy, copy / "model_fp16.plan", "fp16").save(copy)
    (copy / "model_fp16.plan").write_bytes(b"rebuilt by trtexec.sh in place")  # the listed engine, rebuilt
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=120, env=torchless_env)
    assert again.returncode == 1 and "trt: TensorRT is not installed" in again.stderr  # not "sha256 differs"
    (copy / "model_int8-cpu.onnx").write_bytes(b"tampered")
    other = subprocess.run(proc.args, capture_output=True, text=True, timeout=120, env=torchless_env)
    assert other.returncode == 1 and "model_int8-cpu.onnx: sha256 differs" in other.stderr


def run_all(model, feeds: dict, batch: int = 8) -> dict:
    """``model.predict`` over ``feeds`` in batches of ``batch``."""
    parts = [model.predict(feeds[mf.FRAME][i : i + batch], feeds[mf.SPECTROGRAM][i : i + batch])
             for i in range(0, len(feeds[mf.FRAME]), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in mf.OUTPUTS}


@pytest.mark.parametrize("export", ["int8", "tokens"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cpu_matches_onnxruntime_fp32_on_store_samples(exports, samples, export, precision):
    """Baked and tokens-as-input exports; each precision within its tolerance (fp32: and every top-1 the same)."""
    ref = plain(exports[export] / "model_fp32.onnx",
                {**samples.feeds, **({mf.TOKENS: np.load(exports[export] / "tokens_task1.npy")} if export == "tokens" else {})})
    with open_model(exports[export], "torch-cpu", precision, threads=2) as model:
        assert (model.backend, model.precision, model.runner.mode) == ("torch-cpu", precision, "eager")
        assert "torch-cpu as requested (eager mode)" in model.reason
        got = run_all(model, samples.feeds)
    result = parity.check_torch(got, ref, precision, f"torch-cpu {precision}")
    if precision != "fp32":  # the cast really happened: half precision is measurably off fp32, within its tolerance
        assert max(r["max_abs_diff"] for r in result.values()) > 1e-5


def test_torch_backend_refusals(exports, tmp_path):
    with pytest.raises(ValueError, match="torch mode 'graph' captures a CUDA graph: it needs torch-cuda"):
        open_model(exports["int8"], "torch-cpu", mode="graph")
    with pytest.raises(ValueError, match=r"torch mode 'jit': not one of \('eager', 'graph', 'compile', 'compile-graph'\)"):
        open_model(exports["int8"], "torch-cpu", mode="jit")
    with pytest.raises(ValueError, match="compile-graph:reduce-overhead'.* captures CUDA graphs itself"):
        backends.torch_runner()  # the entry point resolves
        from cign_export.torch_backend import parse_mode

        parse_mode("compile-graph:reduce-overhead", "cuda")
    with pytest.raises(ValueError, match="only the torch backends .* take a mode, not 'ort-cpu'"):
        open_model(exports["int8"], "ort-cpu", mode="eager")
    with pytest.raises(ValueError, match=r"precision 'int8-cpu': torch-cpu runs \['fp32', 'fp16', 'bf16'\] of this export"):
        open_model(exports["int8"], "torch-cpu", "int8-cpu")
    moved = shutil.copytree(exports["int8"], tmp_path / "moved")
    data = json.loads((moved / mf.FILENAME).read_text())
    data["checkpoint"]["path"] = str(tmp_path / "elsewhere" / "task_1.pt")
    (moved / mf.FILENAME).write_text(json.dumps(data))
    with pytest.raises(BackendUnavailable, match="torch-cpu: the export's source checkpoint .*elsewhere/task_1.pt is not on"):
        open_model(moved, "torch-cpu")
    assert open_model(moved, "ort-cpu").backend == "ort-cpu"  # the graphs do not need it
    source = mf.Manifest.load(exports["int8"]).checkpoint["path"]
    shutil.copy(source, moved / "task_1.pt")  # copied beside the manifest, as to a device
    assert open_model(moved, "torch-cpu").backend == "torch-cpu"
    with (moved / "task_1.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendUnavailable, match="task_1.pt changed since the export"):
        open_model(moved, "torch-cpu")


def test_torch_cpu_version_swap_shares_the_model_and_runs_the_new_table(exports, samples):
    """A new token table (what an enrolled version brings) reaches the torch runner without reloading it."""
    with open_model(exports["tokens"], "torch-cpu", task=0) as model:
        first = model.predict(samples.feeds[mf.FRAME], samples.feeds[mf.SPECTROGRAM])
        swapped = model.version(exports["tokens"], model.manifest, task=1)
        assert swapped.runner is model.runner and swapped.task == 1
        got = swapped.predict(samples.feeds[mf.FRAME], samples.feeds[mf.SPECTROGRAM])
    table = np.load(exports["tokens"] / "tokens_task1.npy")
    ref = plain(exports["tokens"] / "model_fp32.onnx", {**samples.feeds, mf.TOKENS: table})
    assert first["p_av"].shape == (len(samples), 5) and got["p_av"].shape == (len(samples), 10)
    parity.check_torch(got, ref, "fp32", "torch-cpu after the swap")


def test_torch_cpu_compile_matches_eager(exports, samples):
    feeds = {k: v[:4] for k, v in samples.feeds.items()}
    with open_model(exports["int8"], "torch-cpu", "fp32", mode="eager") as eager:
        ref = eager.predict(feeds[mf.FRAME], feeds[mf.SPECTROGRAM])
    with open_model(exports["int8"], "torch-cpu", "fp32", mode="compile") as compiled:
        assert compiled.runner.mode == "compile" and "(compile mode)" in compiled.reason
        got = compiled.predict(feeds[mf.FRAME], feeds[mf.SPECTROGRAM])
    parity.check_torch(got, ref, "fp32", "torch-cpu compile")


cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here (benchmarks/gpu_check.py runs these where there is one)")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("precision", "mode"), [(p, m) for p in ("fp32", "fp16", "bf16") for m in ("eager", "graph")]
                         + [("fp16", "compile-graph")])  # one compilation: each takes tens of seconds
def test_torch_cuda_matches_onnxruntime_fp32(exports, samples, precision, mode):
    ref = plain(exports["int8"] / "model_fp32.onnx", samples.feeds)
    with open_model(exports["int8"], "torch-cuda", precision, mode=mode) as model:
        got = run_all(model, samples.feeds, batch=1)
    parity.check_torch(got, ref, precision, f"torch-cuda {precision} {mode}")


@pytest.mark.cuda
@cuda
def test_cuda_graph_replays_each_new_input_batch_and_shape(exports, samples):
    """Static buffers: every call's inputs reach the replay (not the capture's), per captured batch size."""
    feeds = samples.feeds
    with open_model(exports["int8"], "torch-cuda", "fp32", mode="eager") as eager, \
            open_model(exports["int8"], "torch-cuda", "fp32", mode="graph") as graph:
        for start, size in ((0, 1), (1, 1), (2, 4), (6, 1), (7, 4)):
            args = feeds[mf.FRAME][start : start + size], feeds[mf.SPECTROGRAM][start : start + size]
            ref, got = eager.predict(*args), graph.predict(*args)
            for name in mf.OUTPUTS:
                np.testing.assert_allclose(got[name], ref[name], atol=1e-5)
        assert len(graph.runner.captured) == 2
        split = graph.runner.split_times({mf.FRAME: args[0], mf.SPECTROGRAM: args[1]})
        assert set(split) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v > 0 for v in split.values())


@pytest.mark.cuda
@cuda
def test_cuda_graph_takes_a_new_token_table(exports, samples):
    """A swapped version's table is copied into the captured graph's buffer (same K, other values)."""
    table = np.load(exports["tokens"] / "tokens_task1.npy")
    with open_model(exports["tokens"], "torch-cuda", "fp32", mode="graph") as model:
        before = model.predict(samples.feeds[mf.FRAME][:1], samples.feeds[mf.SPECTROGRAM][:1])
        model.tokens = np.ascontiguousarray(table[::-1])  # a new array, as Model.version brings
        after = model.predict(samples.feeds[mf.FRAME][:1], samples.feeds[mf.SPECTROGRAM][:1])
    ref = plain(exports["tokens"] / "model_fp32.onnx", {mf.FRAME: samples.feeds[mf.FRAME][:1],
                                                        mf.SPECTROGRAM: samples.feeds[mf.SPECTROGRAM][:1],
                                                        mf.TOKENS: table[::-1].copy()})
    np.testing.assert_allclose(after["p_av"], ref["p_av"], atol=parity.FP32_TOLERANCE)
    assert np.abs(after["p_av"] - before["p_av"]).max() > 1e-3
