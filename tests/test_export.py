"""cign-export on a CIGN run trained by the tests on real avdigits clips: every mode, parity, manifest, TensorRT."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cign_runtime import trt_ops
from cign_export.exporter import Exporter, ExportOptions
from cign_export.parity import load_samples, open_store
from cign_runtime import manifest as mf
from cign_train.checkpoint import TaskCheckpoint

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def eager(ckpt: TaskCheckpoint, feeds, tokens=None):
    """The trained model run the way training evaluates it (torch preprocessing), independent of the export graph."""
    from cign_train.model import predict
    from cign_train.preprocess import normalize_frames, normalize_spectrogram

    model = ckpt.build_model()
    frames = normalize_frames(ckpt.spec, torch.from_numpy(feeds[mf.FRAME]).permute(0, 2, 3, 1).to(torch.uint8))
    specs = normalize_spectrogram(ckpt.spec, torch.from_numpy(feeds[mf.SPECTROGRAM])[:, 0])
    with torch.no_grad():
        p = predict(model(specs, frames, None if tokens is None else torch.from_numpy(tokens)))
    return p.p_a.numpy(), p.p_v.numpy(), p.p_av.numpy()


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """fp32 exports of both tasks, and a tokens-as-input export of the last task."""
    root = tmp_path_factory.mktemp("exports")
    out = {t: Exporter(tiny_run, t, root / f"task{t}", ExportOptions())() for t in (0, 1)}
    out["tokens"] = Exporter(tiny_run, 1, root / "tokens", ExportOptions(tokens_as_input=True))()
    return out


@pytest.mark.parametrize("task", [0, 1])
def test_each_task_exports_a_checked_onnx_matching_the_trained_model(exports, tiny_run, task):
    result = exports[task]
    ckpt = TaskCheckpoint.load(tiny_run / f"task_{task}.pt")
    manifest = mf.Manifest.load(result.out_dir)
    assert manifest.task == task and manifest.classes == ckpt.classes and manifest.n_classes() == len(ckpt.classes)
    assert manifest.checkpoint["sha256"] == mf.sha256(tiny_run / f"task_{task}.pt")
    path = result.out_dir / manifest.artefact("onnx", "fp32").path
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert trt_ops.unsupported(model) == {}
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["cign.classes"]) == ckpt.classes
    assert json.loads(props["cign.spec"]) == ckpt.spec.to_dict()
    assert props["cign.checkpoint_sha256"] == manifest.checkpoint["sha256"]
    assert [i.name for i in model.graph.input] == [mf.FRAME, mf.SPECTROGRAM]
    assert [o.name for o in model.graph.output] == list(mf.OUTPUTS)

    # real test-split clips through onnxruntime against the model evaluated as in training
    samples = load_samples(open_store(ckpt.settings), ckpt.classes, "test")
    got = session(path).run(list(mf.OUTPUTS), samples.feeds)
    for g, r in zip(got, eager(ckpt, samples.feeds)):
        assert g.shape == (len(samples), len(ckpt.classes))
        assert np.abs(g - r).max() <= 1e-4
        assert (g.argmax(1) == r.argmax(1)).all()
    np.testing.assert_allclose(got[2], got[0] * got[1], rtol=1e-6)
    # dynamic batch: one clip at a time gives the same answers
    one = session(path).run(["p_av"], {k: v[:1] for k, v in samples.feeds.items()})[0]
    np.testing.assert_allclose(one, got[2][:1], atol=1e-6)
    assert result.report["parity"]["fp32_vs_eager"]["p_av"]["max_abs_diff"] <= 1e-4


def test_tokens_as_input_swaps_task_tables_in_one_graph(exports, tiny_run):
    result = exports["tokens"]
    manifest = mf.Manifest.load(result.out_dir)
    assert manifest.tokens_as_input and [i.name for i in manifest.inputs] == [mf.FRAME, mf.SPECTROGRAM, mf.TOKENS]
    graph = session(result.out_dir / manifest.artefact("onnx", "fp32").path)
    baked = session(exports[1].out_dir / "model_fp32.onnx")
    ckpt = TaskCheckpoint.load(tiny_run / "task_1.pt")
    samples = load_samples(open_store(ckpt.settings), ckpt.classes, "test")
    for t, k in ((0, 5), (1, 10)):
        table = np.load(result.out_dir / manifest.artefact("tokens", task=t).path)
        assert table.shape == (k, 32)
        got = graph.run(list(mf.OUTPUTS), {**samples.feeds, mf.TOKENS: table})
        assert all(g.shape == (len(samples), k) for g in got)
        for g, r in zip(got, eager(ckpt, samples.feeds, tokens=table)):
            assert np.abs(g - r).max() <= 1e-4 and (g.argmax(1) == r.argmax(1)).all()
        if t == 1:  # the last task's table reproduces the baked graph of that task
            for g, b in zip(got, baked.run(list(mf.OUTPUTS), samples.feeds)):
                assert np.abs(g - b).max() <= 1e-5


def test_tampered_or_swapped_artefacts_are_refused(exports, tmp_path):
    src = exports["tokens"].out_dir
    copy = shutil.copytree(src, tmp_path / "copy")
    mf.Manifest.load(copy)  # intact: loads
    table = copy / "tokens_task0.npy"
    np.save(table, np.load(table) + 1e-3)  # a token table edited after export
    with pytest.raises(ValueError, match="tokens_task0.npy: sha256 differs"):
        mf.Manifest.load(copy)
    shutil.copy(src / "tokens_task0.npy", table)
    shutil.copy(exports[1].out_dir / "model_fp32.onnx", copy / "model_fp32.onnx")  # another export's graph
    with pytest.raises(ValueError, match="model_fp32.onnx: sha256 differs"):
        mf.Manifest.load(copy)
    (copy / "model_fp32.onnx").unlink()
    with pytest.raises(ValueError, match="model_fp32.onnx: missing"):
        mf.Manifest.load(copy)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cign_export.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the clean-failure path is for machines without it")
def test_trt_without_tensorrt_fails_cleanly_and_writes_onnx_manifest_and_trtexec_lines(tiny_run, tmp_path):
    out = tmp_path / "trt"
    proc = _cli("--run", str(tiny_run), "--task", "1", "--trt", "--fp16", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "TensorRT is not installed" in proc.stderr and "trtexec.sh" in proc.stderr + proc.stdout
    manifest = mf.Manifest.load(out)
    assert set(manifest.precisions()) == {"fp32", "fp16"} and manifest.precisions("engine") == []
    script = (out / "trtexec.sh").read_text()
    ten, eleven = script.split('-ge 11')
    assert "--onnx=model_fp32.onnx --saveEngine=model_fp16.plan --fp16" in ten
    assert "--onnx=model_fp16.onnx --saveEngine=model_fp16.plan --minShapes" in eleven  # precision from the ONNX
    assert "--fp16" not in eleven and "--int8" not in eleven
    assert "--minShapes=frame:1x3x64x64,spectrogram:1x1x32x301" in ten
    assert "--maxShapes=frame:8x3x64x64,spectrogram:8x1x32x301" in ten


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (TensorRT needs NVIDIA's index and a GPU)")
def test_trt_builds_an_engine_that_matches_onnxruntime(tiny_run, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT cannot build an engine")
    import tensorrt as trt

    out = tmp_path / "trt"
    result = Exporter(tiny_run, 1, out, ExportOptions(trt=True, precisions=("fp32", "fp16")))()
    assert result.engine_error is None, result.engine_error
    manifest = mf.Manifest.load(out)
    plan = (out / manifest.artefact("engine", "fp32").path).read_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names[:2] == [mf.FRAME, mf.SPECTROGRAM] and set(mf.OUTPUTS) <= set(names)


def test_cli_defaults_pick_the_newest_run_and_its_last_task(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(tiny_run, runs / "mine")
    proc = _cli("--parity-samples", "6", "--int8", "--target", "cpu", cwd=tmp_path)  # int8: onnxruntime's quantizer logs too
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = mf.Manifest.load(tmp_path / "exports" / "mine-task1")
    assert manifest.task == 1 and proc.stderr.count("onnx fp32: ") == 1  # each step logged once, with its time
    assert proc.stderr.count("onnx int8-cpu: ") == 1


@pytest.mark.parametrize("args, message", [
    (["--int8"], "--int8 needs --target"),
    (["--target", "cpu"], "--target applies to --int8 only"),
    (["--task", "7"], "finished tasks are [0, 1]"),
    (["--task", "0", "--all-tasks"], "contradict"),
    (["--precision", "fp16"], "No such option"),
    (["--int8", "--target", "gpu"], "'gpu' is not one of 'trt', 'cpu'"),
])
def test_cli_refuses_bad_options_naming_the_valid_ones(tiny_run, tmp_path, args, message):
    proc = _cli("--run", str(tiny_run), "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_run_whose_method_classifies_beyond_the_network_is_refused(tiny_avdigits, tmp_path):
    """IL2M rescales old-class scores at inference (its own predict): an export of the network alone would
    not classify as the run did, so cign-export refuses it, naming the method, and writes nothing."""
    from cign_train.config import CIGNConfig
    from cign_train.settings import TrainSettings
    from cign_train.trainer import Trainer

    run = tmp_path / "il2m"
    Trainer(TrainSettings(dataset="avdigits", data_dir=str(tiny_avdigits), method="il2m", tasks=2, epochs=1,
                          batch_size=8, buffer_per_class=2, workers=0, max_per_class=2,
                          model=CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4)), run, progress=False).run()
    proc = _cli("--run", str(run), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "method il2m classifies with more than the network's heads" in proc.stderr, proc.stderr
    assert "runs of cign, ewc, finetune, joint, lwf, podnet, ss_il export" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_every_precision_with_tokens_as_input_is_checked_and_swaps_tables(tiny_run, tmp_path):
    from calibration.fp16 import TOLERANCE

    out = tmp_path / "all"
    options = ExportOptions(precisions=("fp32", "fp16", "int8-trt", "int8-cpu"), tokens_as_input=True, calibration_per_class=2)
    result = Exporter(tiny_run, 1, out, options)()
    manifest = mf.Manifest.load(out)
    assert manifest.precisions() == ["fp32", "fp16", "int8-trt", "int8-cpu"]
    ckpt = TaskCheckpoint.load(tiny_run / "task_1.pt")
    samples = load_samples(open_store(ckpt.settings), ckpt.classes, "test")
    for precision in manifest.precisions():
        model = onnx.load(str(out / manifest.artefact("onnx", precision).path))
        onnx.checker.check_model(model, full_check=True)
        if precision != "int8-cpu":  # u8 activations are onnxruntime's CPU recipe, not TensorRT's
            trt_ops.check(model, precision)
        props = {p.key: p.value for p in model.metadata_props}
        assert props["cign.precision"] == precision and props["cign.checkpoint_sha256"] == manifest.checkpoint["sha256"]
        s = session(out / manifest.artefact("onnx", precision).path)
        assert [i.type for i in s.get_inputs()] == ["tensor(float)"] * 3
        for t, k in ((0, 5), (1, 10)):
            table = np.load(out / manifest.artefact("tokens", task=t).path)
            p_av = s.run(["p_av"], {**samples.feeds, mf.TOKENS: table})[0]
            assert p_av.shape == (len(samples), k) and np.isfinite(p_av).all()
    fp16 = result.report["parity"]["fp16_vs_fp32"]
    assert max(v["max_abs_diff"] for v in fp16.values()) <= TOLERANCE
    acc = result.report["accuracy"]
    assert set(acc["test"]) == {"fp32", "fp16", "int8-trt", "int8-cpu"}
    assert set(acc["drop_vs_fp32"]["int8-cpu"]) == {"audio", "visual", "audio_visual"}
    conf = manifest.confidence
    assert conf.fitted_on in ("val", "none") and "ece_before" in conf.metrics


def test_a_failing_step_is_named_and_the_checkpoint_contract_is_checked(tiny_run, tmp_path):
    from cign_export.exporter import ExportError

    with pytest.raises(ExportError, match=r"export step 'load samples' failed: FileNotFoundError: .*--data-dir"):
        Exporter(tiny_run, 1, tmp_path / "x", ExportOptions(data_dir=str(tmp_path / "nowhere")))()
    assert (tmp_path / "x" / "model_fp32.onnx").is_file() and not (tmp_path / "x" / "manifest.json").exists()

    broken = torch.load(tiny_run / "task_1.pt", weights_only=True)
    del broken["classes_per_task"]
    torch.save(broken, tmp_path / "task_1.pt")
    with pytest.raises(ValueError, match=r"task_1.pt: task checkpoint lacks \['classes_per_task'\]"):
        TaskCheckpoint.load(tmp_path / "task_1.pt")
    broken = torch.load(tiny_run / "task_1.pt", weights_only=True)
    broken["classes"] = broken["classes"][:9]
    torch.save(broken, tmp_path / "task_1.pt")
    with pytest.raises(ValueError, match="does not fit task 1 with 9 classes"):
        Exporter(tmp_path, 1, tmp_path / "y", ExportOptions())


def test_the_cpu_presets_audio_pooling_exports_with_parity(tmp_path):
    """``audio_pool = "time_max_mean"`` (the cpu preset's) through torch.onnx: same outputs as eager, TensorRT ops only."""
    from cign_export.graph import ExportGraph
    from cign_export.onnx_format import export_onnx
    from cign_runtime.spec import get_preset
    from cign_train.config import CIGNConfig
    from cign_train.model import CIGN, predict
    from cign_train.preprocess import normalize_frames, normalize_spectrogram

    torch.manual_seed(0)
    spec = get_preset("cpu")
    model = CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4, audio_pool="time_max_mean"), n_classes=4).eval()
    path = export_onnx(ExportGraph(model, spec), tmp_path / "pooled.onnx")
    graph = onnx.load(str(path))
    assert trt_ops.unsupported(graph) == {} and "ReduceMax" in {n.op_type for n in graph.graph.node}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 3, *spec.frame_shape[:2])).astype(np.float32)
    spectrograms = rng.normal(-4.0, 2.0, (3, 1, *spec.spectrogram_shape)).astype(np.float32)
    got = session(path).run(list(mf.OUTPUTS), {mf.FRAME: frames, mf.SPECTROGRAM: spectrograms})
    with torch.no_grad():
        x_v = normalize_frames(spec, torch.from_numpy(frames).permute(0, 2, 3, 1).to(torch.uint8))
        p = predict(model(normalize_spectrogram(spec, torch.from_numpy(spectrograms)[:, 0]), x_v))
    for g, r in zip(got, (p.p_a, p.p_v, p.p_av)):
        assert np.abs(g - r.numpy()).max() <= 1e-4


@pytest.mark.parametrize("tensor, entries", [("audio_encoder.backbone.1.0.weight", 9216),
                                             ("visual_encoder.backbone.1.1.running_var", 32)])
def test_a_checkpoint_with_a_non_finite_weight_or_statistic_is_refused_and_nothing_written(tiny_run, tmp_path, tensor,
                                                                                           entries):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "task_0.pt", run / "task_0.pt")
    broken = torch.load(tiny_run / "task_1.pt", weights_only=True)
    broken["model"][tensor][(0,) * broken["model"][tensor].dim()] = float("nan")
    torch.save(broken, run / "task_1.pt")
    proc = _cli("--run", str(run), "--task", "1", "--out", str(tmp_path / "out"), "--int8", "--target", "cpu")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"task_1.pt: non-finite values in model.{tensor} (1 of {entries} entries)" in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=rf"non-finite values in model.{tensor}"):
        TaskCheckpoint.load(run / "task_1.pt")
