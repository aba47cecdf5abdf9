"""calibration: the class-balanced calibration set, INT8 graphs for TensorRT and the CPU, the FP16
graph and its float16 arithmetic (on a real exported CIGN and its prepared store) and the confidence fit."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from arrays import ArrayReader
from calibration.confidence import ece, evaluate, fit_confidence, nll
from calibration.dataset import StoreReader, calibration_indices
from calibration.fp16 import FP32_OPS, TOLERANCE, reference_outputs, to_fp16
from calibration.quantize import FP16_QDQ_OPSET, ORT_DISABLED_OPTIMIZERS, activation_matmuls, quantize_int8
from cign_runtime import trt_ops
from cign_runtime.confidence import known, top_confidence
from cign_runtime.manifest import OUTPUTS, Confidence
from cign_train.data.ingest import store_dir
from cign_train.data.store import PreparedStore

PER_CLASS = 2  # calibration samples per class in the INT8 tests (the tiny store has 6 train clips a class)
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
#: The float32 op types the tiny CIGN's graph has (LayerNormalization in its transformers, Softmax in
#: attention and grouping, ReduceSum in grouping).
TINY_FP32_OPS = {"LayerNormalization", "Softmax", "ReduceSum"}


@pytest.fixture(scope="module")
def store(tiny_avdigits) -> PreparedStore:
    return PreparedStore(store_dir(tiny_avdigits, "avdigits", "cpu"))


@pytest.fixture(scope="module")
def exported(tiny_run, store, tmp_path_factory):
    """(fp32 ONNX of tiny_run's task_1.pt, its classes as store class indices in model order)."""
    from cign_export.graph import ExportGraph
    from cign_export.onnx_format import export_onnx
    from cign_train.checkpoint import TaskCheckpoint

    ckpt = TaskCheckpoint.load(tiny_run / "task_1.pt")
    path = export_onnx(ExportGraph(ckpt.build_model(), ckpt.spec), tmp_path_factory.mktemp("onnx") / "fp32.onnx",
                       metadata={"task": "1"})
    return path, [store.classes.index(c) for c in ckpt.classes]


@pytest.fixture(scope="module")
def test_split(store, exported):
    """(feeds of the test split of the model's classes, labels in model order, fp32 outputs)."""
    path, classes = exported
    idx = store.indices("test", classes)
    feeds = StoreReader(store, idx, batch_size=len(idx)).get_next()
    labels = np.asarray([classes.index(c) for c in store.labels[idx]])
    return feeds, labels, run(path, feeds)


def calibration_reader(store, classes) -> StoreReader:
    return StoreReader(store, calibration_indices(store, classes, PER_CLASS))


def run(path, feeds, disabled_optimizers=()) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled_optimizers))
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds)))


def initializers(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def float_types(model) -> dict[str, int]:
    """Tensor name -> FLOAT or FLOAT16 for every float tensor of ``model`` (strict ONNX type inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types |= {i.name: i.data_type for i in inferred.initializer}
    return {name: t for name, t in types.items() if t in (F32, F16)}


def precision_of_layers(model) -> dict[str, set[int]]:
    """Node name -> the float types of its inputs and outputs, for every node but Casts that has float tensors."""
    types = float_types(model)
    return {n.name: {types[t] for t in [*n.input, *n.output] if t in types} for n in model.graph.node
            if n.op_type != "Cast" and any(t in types for t in [*n.input, *n.output])}


def assert_float16_but_normalisations_and_outputs(model):
    """Every float layer float16 except FP32_OPS and the ops writing the graph outputs (float32 inputs and
    outputs), with float32 graph inputs and outputs; and no float32 -> float16 -> float32 round trip."""
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {F32}
    layers, producer = precision_of_layers(model), {o: n for n in model.graph.node for o in n.output}
    heads = [producer[o.name] for o in model.graph.output]  # p_audio, p_visual: Sigmoid; p_av: Mul
    assert [n.op_type for n in heads] == ["Sigmoid", "Sigmoid", "Mul"], "outputs computed in float16, then cast"
    kept = {n.name for n in model.graph.node if n.op_type in FP32_OPS} | {n.name for n in heads}
    assert TINY_FP32_OPS <= {n.op_type for n in model.graph.node if n.name in kept}
    assert {n: t for n, t in layers.items() if n in kept and t != {F32}} == {}
    assert {n: t for n, t in layers.items() if n not in kept and t != {F16}} == {}
    for cast in (n for n in model.graph.node if n.op_type == "Cast"):
        up = producer.get(cast.input[0])
        assert not (up is not None and up.op_type == "Cast" and up.input[0] in producer
                    and producer[up.input[0]].name in kept), f"{up.name} -> {cast.name}: a float32 round trip"


def agreement(ref: dict, out: dict) -> tuple[float, float]:
    """(share of equal top-1 classes of p_av, mean |ln p_av - ln p_av_ref|)."""
    top = np.mean(ref["p_av"].argmax(1) == out["p_av"].argmax(1))
    return float(top), float(np.mean(np.abs(np.log(out["p_av"]) - np.log(ref["p_av"]))))


def weight_dequantizers(model):
    """(consumer op type, DequantizeLinear node, int weight) for every quantized weight of Conv/Gemm/MatMul."""
    inits, producer = initializers(model), {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                found.append((node.op_type, dq, inits[dq.input[0]]))
    return found


# ----------------------------------------------------------------------------- calibration set
def test_calibration_set_is_class_balanced_seeded_and_from_its_split(store):
    classes = [7, 2, 5]
    idx = calibration_indices(store, classes, per_class=4, seed=0)
    assert np.all(store.splits[idx] == "train")
    assert np.array_equal(np.bincount(store.labels[idx], minlength=10)[classes], [4, 4, 4])
    assert set(store.labels[idx]) == set(classes)
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx)) == len(idx)
    assert np.array_equal(idx, calibration_indices(store, classes, per_class=4, seed=0))
    assert not np.array_equal(idx, calibration_indices(store, classes, per_class=4, seed=1))
    alone = calibration_indices(store, [2], per_class=4, seed=0)  # a class's pick ignores the others asked for
    assert np.array_equal(alone, idx[store.labels[idx] == 2])
    test = calibration_indices(store, classes, per_class=2, split="test")
    assert np.all(store.splits[test] == "test") and len(test) == 6


def test_short_class_gives_all_it_has_and_says_so(store):
    notes: list[str] = []
    idx = calibration_indices(store, [0, 1], per_class=8, notes=notes)  # 6 train clips a class
    assert np.array_equal(np.sort(idx), np.sort(store.indices("train", [0, 1])))
    assert len(notes) == 2 and "fewer than per_class=8" in notes[0]
    with pytest.warns(UserWarning, match="all 3 taken"):
        calibration_indices(store, [4], per_class=5, split="test")


def test_reader_feeds_batches_with_tokens_and_rewinds(store):
    idx = calibration_indices(store, range(10), per_class=1)
    tokens = np.ones((10, 32), dtype=np.float64)
    reader = StoreReader(store, idx, batch_size=4, tokens=tokens)
    batches = list(reader)
    assert len(batches) == len(reader) == 3 and [len(b["frame"]) for b in batches] == [4, 4, 2]
    first = batches[0]
    size, spec = store.spec.frame_size, store.spec
    assert first["frame"].shape == (4, 3, size, size) and first["frame"].dtype == np.float32
    assert first["spectrogram"].shape == (4, 1, spec.n_freq, spec.n_time) and first["spectrogram"].dtype == np.float32
    assert np.array_equal(first["frame"][0], store.frames(idx[:1])[0].transpose(2, 0, 1))
    assert first["tokens"].dtype == np.float32 and first["tokens"].shape == (10, 32)
    assert reader.get_next() is None
    reader.rewind()
    assert np.array_equal(reader.get_next()["frame"], first["frame"])
    assert "tokens" not in StoreReader(store, idx).get_next()


# ------------------------------------------------------------------------------------- INT8
def test_int8_trt_is_symmetric_per_channel_and_parses_in_tensorrt(store, exported, test_split, tmp_path):
    path, classes = exported
    out = quantize_int8(path, tmp_path / "int8-trt.onnx", calibration_reader(store, classes), "trt")
    model = onnx.load(out)
    trt_ops.check(model, str(out))
    inits = initializers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 100 and all(n.domain == "" for n in qdq)
    for n in qdq:  # a missing zero point would mean uint8; TensorRT dequantizes int8 only (no int32 biases)
        assert len(n.input) == 3, n.name
        zero = inits[n.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), (n.name, zero)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].min() >= -127, n.name
    weights = weight_dequantizers(model)
    assert {op for op, _, _ in weights} == {"Conv", "Gemm", "MatMul"}
    for op, dq, w in weights:
        if op in ("Conv", "Gemm"):  # Gemm weights are (out, in): the exporter sets transB
            axis = {a.name: helper.get_attribute_value(a) for a in dq.attribute}.get("axis")
            assert w.dtype == np.int8 and axis == 0 and inits[dq.input[1]].shape == (w.shape[0],), dq.name
    assert {p.key: p.value for p in model.metadata_props}["task"] == "1"

    feeds, _, ref = test_split
    top, log_diff = agreement(ref, run(out, feeds, ORT_DISABLED_OPTIMIZERS))
    assert top >= 0.8 and log_diff < 0.2, (top, log_diff)


def test_int8_trt_runs_its_float_layers_in_float16_but_normalisations_and_outputs(store, exported, test_split,
                                                                                   tmp_path):
    """TensorRT 11 runs each layer in its ONNX type: float layers outside Q/DQ pairs in float16 (INT8 + FP16,
    as TensorRT 10's two flags), normalisations, reductions and the output ops in float32, Q/DQ scales float16."""
    path, classes = exported
    out = quantize_int8(path, tmp_path / "int8-trt.onnx", calibration_reader(store, classes), "trt")
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") >= FP16_QDQ_OPSET
    assert_float16_but_normalisations_and_outputs(model)
    types, inits = float_types(model), initializers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {types[n.input[1]] for n in qdq} == {F16}
    assert {types[n.output[0]] for n in qdq if n.op_type == "DequantizeLinear"} == {F16}
    assert not any(np.abs(inits[n.input[1]]).min() < np.finfo(np.float16).tiny for n in qdq)  # no subnormal scale

    feeds, _, ref = test_split
    for got in (run(out, feeds, ORT_DISABLED_OPTIMIZERS), reference_outputs(out, feeds)):
        top, log_diff = agreement(ref, got)
        assert top >= 0.8 and log_diff < 0.2, (top, log_diff)


def test_int8_cpu_has_u8_activations_7_bit_s8_weights_and_float_attention_products(store, exported, test_split,
                                                                                    tmp_path):
    path, classes = exported
    out = quantize_int8(path, tmp_path / "int8-cpu.onnx", calibration_reader(store, classes), "cpu")
    model = onnx.load(out)
    inits = initializers(model)
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and {inits[n.input[2]].dtype for n in activations} == {np.dtype(np.uint8)}
    weights = weight_dequantizers(model)
    convs = sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)  # every one has an int8 weight
    assert len(weights) > convs > 10 and all(w.dtype == np.int8 for _, _, w in weights)
    assert max(int(np.abs(w).max()) for _, _, w in weights) == 64  # 7 bits: no saturation on AVX2 kernels
    assert all(n.domain == "" for n in model.graph.node)
    assert set(float_types(model).values()) == {F32}  # onnxruntime's CPU kernels: float layers stay float32
    float_products = activation_matmuls(onnx.load(path))
    assert len(float_products) == 4  # Q K^T and softmax x V in each modality's one transformer layer
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.name in float_products):
        assert node.op_type == "MatMul" and "DequantizeLinear" not in {producer.get(i) for i in node.input}

    feeds, _, ref = test_split
    top, log_diff = agreement(ref, run(out, feeds))
    assert top >= 0.8 and log_diff < 0.2, (top, log_diff)


def test_int8_does_not_print_the_pre_processing_advice_and_leaves_logging_as_it_was(tmp_path, caplog):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")

    reader = ArrayReader("x", [np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)])
    with caplog.at_level(logging.WARNING):
        quantize_int8(tmp_path / "g.onnx", tmp_path / "g_int8.onnx", reader, "cpu")
        logging.warning("a later pre-processing warning of the caller's own")
    assert [r.getMessage() for r in caplog.records] == ["a later pre-processing warning of the caller's own"]


def test_int8_refuses_an_unknown_target(store, exported, tmp_path):
    with pytest.raises(ValueError, match="unknown INT8 target"):
        quantize_int8(exported[0], tmp_path / "x.onnx", StoreReader(store, [0]), "gpu")


# ------------------------------------------------------------------------------------- FP16
def test_fp16_keeps_normalisations_reductions_and_outputs_in_float32_and_the_rest_in_float16(exported, tmp_path):
    """TensorRT 11 runs each layer in its ONNX type (TensorRT 10 ran normalisations in float32 under --fp16)."""
    out = to_fp16(exported[0], tmp_path / "fp16.onnx")
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert_float16_but_normalisations_and_outputs(model)
    assert not any(i.data_type == F32 and np.prod(i.dims) > 1000 for i in model.graph.initializer)
    trt_ops.check(model, str(out))
    assert {p.key: p.value for p in model.metadata_props}["task"] == "1"


def test_fp16_matches_fp32_in_onnxruntime_and_in_float16_arithmetic(exported, test_split, tmp_path):
    out = to_fp16(exported[0], tmp_path / "fp16.onnx")
    feeds, _, ref = test_split
    for got in (run(out, feeds), reference_outputs(out, feeds)):
        for name in OUTPUTS:
            assert got[name].dtype == np.float32
            assert np.abs(got[name] - ref[name]).max() <= TOLERANCE, name
        top, log_diff = agreement(ref, got)
        assert top >= 0.95 and log_diff < 0.02, (top, log_diff)


def test_reference_outputs_compute_in_float16_with_float32_sums(tmp_path):
    """2048 + 1 is 2048 in float16, and onnxruntime's CPU provider says 2049 (it adds in float32), so its
    parity says little about float16 arithmetic; a float16 product of 4096 terms sums in float32 (a float16
    running sum stops at 2048), as GPU matrix kernels do."""
    ones = numpy_helper.from_array(np.ones((4096, 1), np.float16), "ones")
    one, big = (numpy_helper.from_array(np.array(v, np.float16), n) for v, n in ((1, "one"), (2048, "big")))
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=F16), helper.make_node("Add", ["h", "one"], ["a"]),
         helper.make_node("Sub", ["a", "big"], ["b"]), helper.make_node("Cast", ["b"], ["y"], to=F32),
         helper.make_node("Cast", ["row"], ["r"], to=F16), helper.make_node("MatMul", ["r", "ones"], ["m"]),
         helper.make_node("Cast", ["m"], ["s"], to=F32)], "g",
        [helper.make_tensor_value_info("x", F32, [1]), helper.make_tensor_value_info("row", F32, [1, 4096])],
        [helper.make_tensor_value_info("y", F32, [1]), helper.make_tensor_value_info("s", F32, [1, 1])],
        [ones, one, big])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "g.onnx")
    feeds = {"x": np.array([2048], np.float32), "row": np.ones((1, 4096), np.float32)}
    got = reference_outputs(tmp_path / "g.onnx", feeds)
    assert got["y"].tolist() == [0.0] and got["s"].tolist() == [[4096.0]]
    cpu = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    assert cpu.tolist() == [1.0]


# ------------------------------------------------------------------------------- confidence
def overconfident(seed: int, n: int = 400, k: int = 10):
    """Synthetic validation p_av whose ln p_av is twice too sharp, and labels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, k))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # calibrated: labels are drawn from it
    labels = np.array([rng.choice(k, p=row) for row in q])
    return q ** 2, labels


def test_temperature_lowers_validation_nll_and_follows_the_validation_data():
    p_av, labels = overconfident(0)
    fit = fit_confidence(p_av, labels)
    assert isinstance(fit, Confidence) and fit.fitted_on == "val" and "95 %" in fit.rule
    assert 1.8 < fit.temperature < 2.2  # undoes the square
    assert fit.metrics["nll_after"] < fit.metrics["nll_before"] - 0.1
    assert fit.metrics["nll_after"] == pytest.approx(nll(p_av, labels, fit.temperature))
    assert fit.metrics["ece_after"] < fit.metrics["ece_before"]
    # softmax(ln p^0.5 / (T / 2)) == softmax(ln p / T): the square root of the validation p_av halves T
    assert p_av.min() > 1e-10  # no p_av at the runtime's ln floor, where the identity would not hold
    root = fit_confidence(p_av ** 0.5, labels)
    assert root.temperature == pytest.approx(fit.temperature / 2, rel=1e-3)
    assert root.threshold == pytest.approx(fit.threshold, rel=1e-3)
    other = fit_confidence(*overconfident(1))
    assert other.temperature != fit.temperature and other.threshold != fit.threshold


def test_fit_uses_only_the_validation_arrays_it_is_given(test_split):
    val_p, val_y = overconfident(0)
    fit = fit_confidence(val_p, val_y)
    _, labels, ref = test_split  # a real model's test predictions: reported with the val fit, never fitted on
    report = evaluate(ref["p_av"], labels, fit)
    assert fit_confidence(val_p, val_y) == fit and fit.metrics["n"] == len(val_y)
    assert report["n"] == len(labels) and 0 <= report["coverage"] <= 1
    assert report["accuracy"] == pytest.approx(np.mean(ref["p_av"].argmax(1) == labels))


def test_threshold_keeps_95_percent_of_correct_validation_predictions():
    p_av, labels = overconfident(2, n=1000)
    fit = fit_confidence(p_av, labels)
    top, conf = top_confidence(p_av, fit.temperature)
    correct = conf[top == labels]
    n = len(correct)
    assert np.sum(correct >= fit.threshold) == n - int(np.floor(0.05 * n))  # the 5th percentile, no lower
    assert fit.metrics["correct_kept"] >= 0.95
    answered = known(p_av, fit.temperature, fit.threshold)
    assert fit.metrics["coverage"] == pytest.approx(answered.mean())
    assert fit.metrics["answered_accuracy"] == pytest.approx(np.mean((top == labels)[answered]))


def test_ece_of_a_hand_made_case():
    # calibrated(p_av, 1) of two classes whose p_av sums to 1 is p_av itself
    p_av = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45], [0.15, 0.85]])
    labels = np.array([0, 1, 1, 0, 1])
    # top-1 confidences 0.9 (right), 0.9 (wrong), 0.7, 0.55, 0.85 (right); bins of width 1/15:
    # 0.9 -> (13/15, 14/15], 0.7 -> (10/15, 11/15], 0.55 -> (8/15, 9/15], 0.85 -> (12/15, 13/15]
    # ECE = sum |B| / n * |acc(B) - conf(B)| = 2/5 |0.5 - 0.9| + 1/5 |1 - 0.7| + 1/5 |1 - 0.55| + 1/5 |1 - 0.85|
    assert ece(p_av, labels) == pytest.approx(0.16 + 0.06 + 0.09 + 0.03)
    assert ece(p_av, labels, bins=1) == pytest.approx(abs(0.8 - (0.9 + 0.9 + 0.7 + 0.55 + 0.85) / 5))
    report = evaluate(p_av, labels, Confidence(1.0, 0.75))  # answers 0.9, 0.9, 0.85
    assert report["coverage"] == pytest.approx(3 / 5) and report["answered_accuracy"] == pytest.approx(2 / 3)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="no validation prediction is correct"):
        fit_confidence(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([1, 0]))
    with pytest.raises(ValueError, match="labels outside"):
        fit_confidence(np.array([[0.9, 0.1]]), np.array([2]))


# ------------------------------------------------------------------------------------ no torch
def test_package_imports_without_torch(tmp_path, torchless_env):
    code = """
import calibration, calibration.confidence, calibration.dataset, calibration.fp16, calibration.quantize
try:
    import torch
except ImportError as e:
    assert "blocked" in str(e), e
else:
    raise SystemExit("the fake torch was not first on the path")
print("imported without torch")
"""
    done = subprocess.run([sys.executable, "-c", code], env=torchless_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "imported without torch", done.stderr[-2000:]
