"""An export of a CIGN with random weights at a training preset's shapes, for speed measurements
(``cign-bench --preset``): no training needed, the same graphs ``cign-export`` writes.

The model is ``CIGN(PRESETS[preset]["model"], classes)`` seeded with ``seed``; its task checkpoint
(``random_task0.pt``, the layout ``cign_train.checkpoint`` defines) is written beside the graphs
so the torch backends can rebuild it. INT8 graphs are calibrated, as ``cign-export`` calibrates
them, on a class-balanced set of real avdigits clips prepared at the preset's spec (generated and
prepared under ``data_dir`` when missing; without INT8 precisions no data is needed): the scales
do not change the speed, but real inputs keep the quantized graph the one a trained model would get. The manifest's accuracy fields stay
empty: random weights have none.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from calibration.dataset import StoreReader, calibration_indices
from calibration.fp16 import to_fp16
from calibration.quantize import quantize_int8
from cign_export.graph import ExportGraph, input_infos, output_infos
from cign_export.onnx_format import DEFAULT_OPSET, export_onnx
from cign_runtime import manifest as mf
from cign_runtime.spec import get_preset
from cign_train.checkpoint import TaskCheckpoint
from cign_train.data.ingest import prepare_dataset, store_dir
from cign_train.data.store import PreparedStore
from cign_train.model import CIGN
from cign_train.settings import PRESETS

#: The number of classes ``cign-bench --preset`` uses by default: the paper's VGGSound-100 after its last task.
DEFAULT_CLASSES = {"cpu": 10, "paper": 100}


def calibration_store(spec_name: str, data_dir: Path) -> PreparedStore:
    """The avdigits store prepared at ``spec_name`` under ``data_dir`` (generated and prepared when missing)."""
    root = store_dir(data_dir, "avdigits", spec_name)
    if not (root / "index.json").is_file():
        prepare_dataset("avdigits", data_dir, preset=spec_name, progress=True)
    return PreparedStore(root)


def export_preset(preset: str, out_dir: Path, classes: int | None = None, precisions=("fp32", "fp16", "int8-cpu", "int8-trt"),
                  data_dir: Path = Path("data"), seed: int = 0) -> mf.Manifest:
    """Write a random-weight CIGN of ``preset`` with ``classes`` classes as an export folder; its manifest."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    k = classes or DEFAULT_CLASSES[preset]
    cfg, spec_name = PRESETS[preset]["model"], PRESETS[preset]["spec"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CIGN(cfg, k).eval()
    int8 = any(p.startswith("int8-") for p in precisions)
    store = calibration_store(spec_name, Path(data_dir)) if int8 else None
    spec = store.spec if int8 else get_preset(spec_name)
    names = [f"class_{i:03d}" for i in range(k)]
    ckpt_path = out / "random_task0.pt"
    TaskCheckpoint(task=0, model=model.state_dict(), config=cfg, spec=spec, classes=names, classes_per_task=[k],
                   tokens=model.tokens.detach().clone(), method="random", settings={"preset": preset, "seed": seed},
                   buffer={}, evaluation={}).save(ckpt_path)
    meta = {"cign.task": 0, "cign.classes": json.dumps(names), "cign.spec": spec.to_json(),
            "cign.random_weights": f"{preset} seed {seed}"}
    fp32 = export_onnx(ExportGraph(model, spec), out / "model_fp32.onnx", DEFAULT_OPSET, meta)
    artefacts = [mf.Artefact.of(out, fp32, "onnx", precision="fp32")]
    calibration = calibration_indices(store, range(len(store.classes)), per_class=10, seed=seed) if int8 else None
    for precision in precisions:
        path = out / f"model_{precision}.onnx"
        if precision == "fp16":
            to_fp16(fp32, path)
        elif precision.startswith("int8-"):
            quantize_int8(fp32, path, StoreReader(store, calibration), precision.removeprefix("int8-"))
        elif precision != "fp32":
            raise ValueError(f"unknown precision {precision!r}; choose from {mf.PRECISIONS}")
        if precision != "fp32":
            artefacts.append(mf.Artefact.of(out, path, "onnx", precision=precision))
    manifest = mf.Manifest(task=0, classes=names, classes_per_task=[k], spec=spec,
                           inputs=input_infos(spec, cfg.dim, False), outputs=output_infos(), opset=DEFAULT_OPSET,
                           tokens_as_input=False, artefacts=artefacts,
                           checkpoint={"path": str(ckpt_path.resolve()), "sha256": mf.sha256(ckpt_path)},
                           created_by=f"cign-bench --preset {preset} (random weights, seed {seed})")
    manifest.save(out)
    return manifest
