"""The exporter: one task checkpoint -> ONNX per precision (+ TensorRT engines), parity report, manifest.

Like the Ultralytics exporter, the model is prepared once (checkpoint -> ``ExportGraph`` in eval
mode, one metadata dict), then each format is one function (``onnx_format.export_onnx``,
``engine.build_engine``); every step logs its time and artefact size and a failure re-raises
with the step named.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cign_export import engine as trt_engine
from cign_export import parity
from cign_export.graph import ExportGraph, input_infos, output_infos
from cign_export.onnx_format import DEFAULT_OPSET, export_onnx
from cign_runtime import manifest as mf
from cign_train import checkpoint as ck
from cign_train.methods import available, get_method

log = logging.getLogger("cign_export")

#: Goals of each precision's accuracy drop against fp32 (points, any modality), reported by export.
DROP_GOALS = {"fp16": 0.2, "int8-trt": 1.0, "int8-cpu": 1.0}
#: TensorRT engines exist for these precisions (int8-cpu is onnxruntime's CPU recipe: u8 activations).
ENGINE_PRECISIONS = ("fp32", "fp16", "int8-trt")


#: Where the exemplar features of a tokens-as-input export come from (:func:`exemplar_indices`).
EXEMPLAR_SPLIT = "val"


def exemplar_indices(store, classes: list[str], per_class: int, seed: int, notes: list[str] | None = None) -> np.ndarray:
    """Store indices of the exemplars ``cign-enroll`` fits new tokens against: ``per_class`` seeded clips of each
    class from the val split, which the model never trained on. Features of the training buffer's clips, which
    the encoders have fitted, were too easy as negatives: on avdigits' val split a token fitted against them
    named old-class clips as the new class several times as often (``benchmarks/bench_enroll.py``)."""
    from calibration.dataset import calibration_indices

    return calibration_indices(store, [store.classes.index(c) for c in classes], per_class, seed, EXEMPLAR_SPLIT, notes)


class ExportError(RuntimeError):
    """A step of the export failed; the message names the step."""


@dataclass
class ExportOptions:
    precisions: tuple[str, ...] = ("fp32",)  # fp32 is always exported first
    tokens_as_input: bool = False
    trt: bool = False
    opset: int = DEFAULT_OPSET
    max_batch: int = mf.DEFAULT_MAX_BATCH  # TensorRT profile: batch 1 / 1 / max_batch
    calibration_per_class: int = 10  # INT8 calibration samples per seen class (train split)
    parity_samples: int | None = None  # test samples for parity and accuracy (None: the whole split)
    seed: int = 0
    data_dir: str | None = None  # where the run's prepared store is (default: the run's data_dir)
    exemplars_per_class: int = 8  # tokens-as-input: val clips per class kept as encoder features for cign-enroll


@dataclass
class ExportResult:
    out_dir: Path
    manifest: mf.Manifest | None
    report: dict = field(default_factory=dict)
    engine_error: str | None = None  # --trt asked but TensorRT failed (everything else was written)


@contextlib.contextmanager
def step(name: str, report: dict, path: Path | None = None):
    """Time a step, log it with the artefact's size, and re-raise a failure with the step named."""
    start = time.perf_counter()
    try:
        yield
    except (ExportError, trt_engine.TensorRTUnavailable):
        raise
    except Exception as e:
        raise ExportError(f"export step '{name}' failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - start
    entry = {"seconds": round(seconds, 3)}
    if path is not None and Path(path).is_file():
        entry["bytes"] = Path(path).stat().st_size
    report.setdefault("steps", {})[name] = entry
    size = f", {entry['bytes'] / 1e6:.1f} MB" if "bytes" in entry else ""
    log.info("%s: %.1f s%s%s", name, seconds, size, f" -> {path}" if path else "")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def refuse_methods_beyond_the_network(method: str, path: Path) -> None:
    """A ValueError for a run whose method classifies with more than the network (iCaRL's class means,
    IL2M's and BiC's calibrations, L2P's and DualPrompt's prompts): its export would not predict as it did.
    A name outside the registry (``cign_export.preset``'s random weights) is the network alone."""
    if method in available() and not get_method(method).predicts_with_heads():
        own = ", ".join(m for m in available() if get_method(m).predicts_with_heads())
        raise ValueError(f"{path}: method {method} classifies with more than the network's heads (its own "
                         f"predict), which the export does not carry; runs of {own} export")


class Exporter:
    """Export ``task_{task}.pt`` of ``run_dir`` into ``out_dir``."""

    def __init__(self, run_dir: Path, task: int, out_dir: Path, options: ExportOptions):
        self.run_dir, self.task, self.out = Path(run_dir), task, Path(out_dir)
        self.opt = options
        self.ckpt_path = ck.task_path(self.run_dir, task)
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"{self.ckpt_path}: no checkpoint of task {task} in {self.run_dir}")
        self.ckpt = ck.TaskCheckpoint.load(self.ckpt_path)
        refuse_methods_beyond_the_network(self.ckpt.method, self.ckpt_path)
        self.graph = ExportGraph(self.ckpt.build_model(), self.ckpt.spec, options.tokens_as_input)
        self.ckpt_sha = mf.sha256(self.ckpt_path)
        self.metadata = {
            "cign.task": self.task,
            "cign.classes": json.dumps(self.ckpt.classes),
            "cign.classes_per_task": json.dumps(self.ckpt.classes_per_task),
            "cign.spec": self.ckpt.spec.to_json(),
            "cign.tokens_as_input": int(options.tokens_as_input),
            "cign.checkpoint_sha256": self.ckpt_sha,
            "cign.normalization": mf.NORMALIZATION,
        }

    # ----------------------------------------------------------------------------- helpers
    def tables(self) -> dict[int, np.ndarray]:
        """Tokens-as-input: table t = the first K_t rows of this task's table (classes of tasks 0..t)."""
        tokens = self.ckpt.tokens.float().numpy()
        ends = np.cumsum(self.ckpt.classes_per_task)
        return {t: np.ascontiguousarray(tokens[: ends[t]]) for t in range(self.task + 1)}

    def onnx_path(self, precision: str) -> Path:
        return self.out / f"model_{precision}.onnx"

    def stamp(self, path: Path, precision: str) -> None:
        """Write the export metadata (spec, classes, checkpoint hash, precision) into an ONNX's metadata_props."""
        import onnx

        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, {k: str(v) for k, v in {**self.metadata, "cign.precision": precision}.items()})
        onnx.save(model, str(path))

    # -------------------------------------------------------------------------------- run
    def __call__(self) -> ExportResult:
        import onnxruntime as ort

        self.out.mkdir(parents=True, exist_ok=True)
        report: dict = {"run": str(self.run_dir), "task": self.task, "checkpoint_sha256": self.ckpt_sha,
                        "tokens_as_input": self.opt.tokens_as_input, "versions": versions()}
        artefacts: list[mf.Artefact] = []
        tables = self.tables() if self.opt.tokens_as_input else {}
        table = tables.get(self.task)

        fp32 = self.onnx_path("fp32")
        with step("onnx fp32", report, fp32):
            export_onnx(self.graph, fp32, self.opt.opset, {**self.metadata, "cign.precision": "fp32"})
        for t, tab in tables.items():
            path = self.out / f"tokens_task{t}.npy"
            np.save(path, tab)
            artefacts.append(mf.Artefact.of(self.out, path, "tokens", task=t))

        with step("load samples", report):
            store = parity.open_store(self.ckpt.settings, self.opt.data_dir)
            test = parity.load_samples(store, self.ckpt.classes, "test", self.opt.parity_samples, self.opt.seed)
            val = parity.load_samples(store, self.ckpt.classes, "val", None, self.opt.seed)
        report["samples"] = {"test": len(test), "val": len(val), "store": str(store.root)}
        if self.opt.tokens_as_input:
            artefacts += self.enrolment_artefacts(store, report)

        sessions = {}
        outputs = {}
        with step("parity fp32", report):
            sessions["fp32"] = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
            eager = parity.run_eager(self.graph, test.feeds, tokens=table)
            outputs["fp32"] = parity.run_session(sessions["fp32"], test.feeds, tokens=table)
            report.setdefault("parity", {})["fp32_vs_eager"] = parity.check_fp32(outputs["fp32"], eager, str(fp32))
            if tables:  # every task's table through the one graph, against eager with that table
                report["parity"]["tables"] = {
                    t: parity.check_fp32(parity.run_session(sessions["fp32"], test.feeds, tokens=tab),
                                         parity.run_eager(self.graph, test.feeds, tokens=tab), f"{fp32} tokens_task{t}")
                    for t, tab in tables.items() if t != self.task
                }
        artefacts.append(mf.Artefact.of(self.out, fp32, "onnx", precision="fp32"))

        for precision in self.opt.precisions:
            if precision == "fp32":
                continue
            path = self.onnx_path(precision)
            with step(f"onnx {precision}", report, path):
                self.derive(precision, fp32, path, store, table)
                self.stamp(path, precision)
                sessions[precision] = ort.InferenceSession(
                    str(path), providers=["CPUExecutionProvider"],
                    disabled_optimizers=list(mf.DISABLED_OPTIMIZERS.get(precision, ())))
                outputs[precision] = parity.run_session(sessions[precision], test.feeds, tokens=table)
                report["parity"][f"{precision}_vs_fp32"] = parity.compare(outputs[precision], outputs["fp32"])
                if precision == "fp16":
                    parity.check_fp16(outputs[precision], outputs["fp32"], str(path))
            artefacts.append(mf.Artefact.of(self.out, path, "onnx", precision=precision))

        report["accuracy"] = self.accuracy_report(outputs, test.labels)

        with step("confidence", report):
            confidence = self.fit_confidence(sessions["fp32"], val, test, outputs["fp32"], table)
        report["confidence"] = {"temperature": confidence.temperature, "threshold": confidence.threshold,
                                **confidence.metrics}

        engines = [p for p in self.opt.precisions if p in ENGINE_PRECISIONS]
        artefacts.append(self.write_trtexec(engines, report))
        engine_error = None
        if self.opt.trt:
            try:
                artefacts += self.build_engines(engines, report)
            except (trt_engine.TensorRTUnavailable, ExportError) as e:
                engine_error = report["tensorrt_error"] = str(e)

        report_path = self.out / "report.json"
        report_path.write_text(json.dumps(report, indent=1, default=str))
        artefacts.append(mf.Artefact.of(self.out, report_path, "report"))
        manifest = mf.Manifest(
            task=self.task, classes=list(self.ckpt.classes), classes_per_task=list(self.ckpt.classes_per_task),
            spec=self.ckpt.spec, inputs=input_infos(self.ckpt.spec, self.ckpt.config.dim, self.opt.tokens_as_input),
            outputs=output_infos(), opset=self.opt.opset, tokens_as_input=self.opt.tokens_as_input,
            artefacts=artefacts, checkpoint={"path": str(self.ckpt_path.resolve()), "sha256": self.ckpt_sha},
            confidence=confidence, created_by=f"cign-export {json.dumps(report['versions'])}",
            profile={name: [list(s) for s in shapes] for name, shapes in self.profile().shapes.items()},
        )
        manifest.save(self.out)
        return ExportResult(self.out, manifest, report, engine_error)

    def enrolment_artefacts(self, store, report: dict) -> list[mf.Artefact]:
        """What ``cign-enroll`` needs (``cign_export.enrolment``): the encoders graph (parity-checked against
        eager), the post-encoder weights, and the features of the buffer's first exemplars of each class."""
        import onnxruntime as ort

        from cign_export import enrolment

        encoders = enrolment.Encoders(self.graph.model, self.graph.normalize, self.ckpt.spec)
        path = self.out / "encoders_fp32.onnx"
        with step("onnx encoders", report, path):
            export_onnx(encoders, path, self.opt.opset, {**self.metadata, "cign.precision": "fp32"}, mf.FEATURES)
        head = self.out / "head.npz"
        with step("head weights", report, head):
            enrolment.save_head(self.graph.model, head)
        exemplars = self.out / "exemplars.npz"
        with step("exemplar features", report, exemplars):
            notes: list[str] = []
            idx = exemplar_indices(store, self.ckpt.classes, self.opt.exemplars_per_class, self.opt.seed, notes)
            for note in notes:
                log.warning("exemplars: %s", note)
            model_class = {store.classes.index(c): k for k, c in enumerate(self.ckpt.classes)}
            labels = np.array([model_class[int(s)] for s in store.labels[idx]], np.int64)
            report["exemplars"] = {"split": EXEMPLAR_SPLIT, "store_indices": idx.tolist()}
            feeds = mf.feed(store.frames(idx), store.spectrograms(idx))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            f_a, f_v = (np.concatenate(p) for p in zip(*(session.run(list(mf.FEATURES), {k: v[s : s + 32] for k, v in feeds.items()})
                                                         for s in range(0, len(idx), 32))))
            e_a, e_v = enrolment.encode(encoders, feeds)
            diffs = {name: float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
                     for name, got, ref in zip(mf.FEATURES, (f_a, f_v), (e_a, e_v))}
            report.setdefault("parity", {})["encoders_vs_eager_relative"] = diffs
            if max(diffs.values()) > parity.FP32_TOLERANCE:
                raise parity.ParityError(f"{path}: encoder features differ from PyTorch eager by more than "
                                         f"{parity.FP32_TOLERANCE} of their range: {diffs}")
            enrolment.save_exemplars(exemplars, f_a, f_v, labels)
        return [mf.Artefact.of(self.out, path, "encoders", precision="fp32"), mf.Artefact.of(self.out, head, "head"),
                mf.Artefact.of(self.out, exemplars, "exemplars")]

    def write_trtexec(self, engines: list[str], report: dict) -> mf.Artefact:
        """``trtexec.sh``: builds every engine on the device with its trtexec (TensorRT 10 or 11+); the report
        keeps the lines, with the script's ``$TRTEXEC`` and ``$CACHE``."""
        profile = self.profile()
        onnx_files = {p: self.onnx_path(p).name for p in self.opt.precisions}
        script = self.out / "trtexec.sh"
        script.write_text(trt_engine.trtexec_script(onnx_files, engines, profile))
        script.chmod(0o755)
        report["trtexec"] = {v: [trt_engine.trtexec_command(onnx_files, p, v, profile, trt_engine.engine_name(p))
                                 for p in engines] for v in (10, 11)}
        return mf.Artefact.of(self.out, script, "trtexec")

    def build_engines(self, engines: list[str], report: dict) -> list[mf.Artefact]:
        """One serialized TensorRT engine per precision, each from the ONNX its TensorRT version needs."""
        built = []
        for p in engines:
            path = self.out / trt_engine.engine_name(p)
            with step(f"tensorrt {p}", report, path):
                _, version = trt_engine.import_tensorrt()
                source = self.onnx_path(trt_engine.onnx_source(p, version))
                trt_engine.build_engine(source, path, p, self.profile(), self.out)
            built.append(mf.Artefact.of(self.out, path, "engine", precision=p))
        return built

    def profile(self) -> trt_engine.Profile:
        k = len(self.ckpt.classes)
        return trt_engine.Profile.for_inputs(input_infos(self.ckpt.spec, self.ckpt.config.dim, self.opt.tokens_as_input),
                                             self.opt.max_batch, (self.ckpt.classes_per_task[0], k, k))

    def derive(self, precision: str, fp32: Path, path: Path, store, table) -> None:
        """fp16 or INT8 (trt / cpu target) from the fp32 ONNX (``calibration``)."""
        if precision == "fp16":
            from calibration.fp16 import to_fp16

            to_fp16(fp32, path)
            return
        from calibration import dataset, quantize

        store_classes = [store.classes.index(c) for c in self.ckpt.classes]
        notes: list[str] = []
        idx = dataset.calibration_indices(store, store_classes, self.opt.calibration_per_class, self.opt.seed, notes=notes)
        for note in notes:
            log.warning("calibration set: %s", note)
        reader = dataset.StoreReader(store, idx, tokens=table)
        quantize.quantize_int8(fp32, path, reader, precision.removeprefix("int8-"))

    def accuracy_report(self, outputs: dict, labels: np.ndarray) -> dict:
        acc = {p: parity.accuracy(o, labels) for p, o in outputs.items()}
        drops = {p: {m: round(acc["fp32"][m] - a, 3) for m, a in acc[p].items()} for p in acc if p != "fp32"}
        goals = {p: {"goal_max_drop": DROP_GOALS[p], "met": max(d.values()) <= DROP_GOALS[p]} for p, d in drops.items()}
        return {"test": acc, "drop_vs_fp32": drops, "goals": goals}

    def fit_confidence(self, session, val, test, test_outputs, table) -> mf.Confidence:
        """Temperature and threshold of p_av fitted on the val split; ECE etc. on test for the report."""
        from calibration import confidence as conf

        val_p = parity.run_session(session, val.feeds, tokens=table)["p_av"]
        try:
            fitted = conf.fit_confidence(val_p, val.labels)
        except ValueError as e:  # e.g. no correct val prediction: the runtime then answers every clip
            log.warning("confidence not fitted (%s): temperature 1, threshold 0", e)
            return mf.Confidence(1.0, 0.0, "none", f"not fitted: {e}",
                                 {"ece_before": conf.ece(val_p, val.labels), "ece_after": conf.ece(val_p, val.labels)})
        test_metrics = conf.evaluate(test_outputs["p_av"], test.labels, fitted)
        return mf.Confidence(fitted.temperature, fitted.threshold, fitted.fitted_on, fitted.rule,
                             {**fitted.metrics, "test": test_metrics})
