"""Parity and accuracy of exported graphs on real prepared-store samples.

Export checks itself: the fp32 ONNX in onnxruntime against PyTorch eager on the run's test split
(max |difference| of each output <= 1e-4 and identical top-1), and every precision's top-1
accuracy (audio, visual, audio-visual) against fp32's. The torch backends
(``cign_export.torch_backend``) are held to ``TORCH_TOLERANCES`` against onnxruntime fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.fp16 import TOLERANCE as FP16_TOLERANCE
from cign_runtime import manifest as mf
from cign_train.data.store import PreparedStore

FP32_TOLERANCE = 1e-4  # max |onnxruntime - eager| per output, fp32
#: Max |p_torch - p_onnxruntime fp32| per output accepted from the torch backends, per precision: fp32
#: as the export's own check; fp16 and bf16 three times the largest difference measured on torch-cpu
#: (``benchmarks/bench_torch_parity.py``, three trained avdigits models, 320 test clips each: fp16
#: 0.018, bf16 0.063, both on p_audio). PyTorch's CPU half-precision kernels are looser than the FP16
#: ONNX's (``calibration.fp16``); bf16 keeps 8 bits of mantissa against fp16's 11.
TORCH_TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": 0.05, "bf16": 0.2}
MODALITY_OUTPUTS = {"audio": "p_audio", "visual": "p_visual", "audio_visual": "p_av"}


class ParityError(RuntimeError):
    """An exported graph disagrees with the model it came from; the message has the numbers."""


@dataclass
class Samples:
    """Store samples of a checkpoint's classes: graph feeds and model class labels."""

    split: str
    indices: np.ndarray
    feeds: dict[str, np.ndarray]
    labels: np.ndarray  # model class index (position in the checkpoint's class list)

    def __len__(self) -> int:
        return len(self.labels)


def load_samples(store: PreparedStore, classes: list[str], split: str, limit: int | None = None, seed: int = 0) -> Samples:
    """The ``split`` samples of ``classes`` (a seeded subset of ``limit`` when given), as graph feeds."""
    missing = [c for c in classes if c not in store.classes]
    if missing:
        raise ValueError(f"{store.root}: the store has no classes {missing[:5]} of the checkpoint")
    store_ids = [store.classes.index(c) for c in classes]
    idx = store.indices(split, store_ids)
    if len(idx) == 0:
        raise ValueError(f"{store.root}: no {split} samples of the checkpoint's classes")
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    label_of = {s: k for k, s in enumerate(store_ids)}
    labels = np.array([label_of[int(s)] for s in store.labels[idx]], dtype=np.int64)
    return Samples(split, idx, mf.feed(store.frames(idx), store.spectrograms(idx)), labels)


def run_session(session, feeds: dict[str, np.ndarray], batch: int = 16, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """onnxruntime outputs over ``feeds`` in batches -> {output name: (N, K)}."""
    names = [o.name for o in session.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in feeds.items()}
        if tokens is not None:
            chunk[mf.TOKENS] = tokens
        for part, out in zip(parts, session.run(names, chunk)):
            part.append(out)
    return {name: np.concatenate(p) for name, p in zip(names, parts)}


def run_eager(graph, feeds: dict[str, np.ndarray], batch: int = 16, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The same outputs from the PyTorch graph (``cign_export.graph.ExportGraph``)."""
    import torch

    n = len(feeds[mf.FRAME])
    parts: list[list[np.ndarray]] = [[] for _ in mf.OUTPUTS]
    tok = None if tokens is None else torch.from_numpy(np.asarray(tokens, dtype=np.float32))
    with torch.inference_mode():
        for start in range(0, n, batch):
            args = [torch.from_numpy(feeds[k][start : start + batch]) for k in (mf.FRAME, mf.SPECTROGRAM)]
            for part, out in zip(parts, graph(*args, tok)):
                part.append(out.float().numpy())
    return {name: np.concatenate(p) for name, p in zip(mf.OUTPUTS, parts)}


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Max |difference| per output and the fraction of samples whose top-1 agrees, per output."""
    return {
        name: {"max_abs_diff": float(np.abs(got[name] - ref[name]).max()),
               "top1_agreement": float((got[name].argmax(1) == ref[name].argmax(1)).mean())}
        for name in mf.OUTPUTS
    }


def check_fp32(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], where: str) -> dict:
    """``compare``, raising ParityError unless every output is within FP32_TOLERANCE with identical top-1."""
    result = compare(got, ref)
    bad = {k: v for k, v in result.items() if v["max_abs_diff"] > FP32_TOLERANCE or v["top1_agreement"] < 1.0}
    if bad:
        raise ParityError(f"{where}: onnxruntime fp32 differs from PyTorch eager beyond {FP32_TOLERANCE} "
                          f"or in top-1: {bad}")
    return result


def check_fp16(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], where: str) -> None:
    """Raise ParityError when an FP16 graph's outputs leave ``calibration.fp16.TOLERANCE`` of fp32's."""
    worst = {k: v["max_abs_diff"] for k, v in compare(got, ref).items()}
    if max(worst.values()) > FP16_TOLERANCE:
        raise ParityError(f"{where}: fp16 outputs differ from fp32 by more than {FP16_TOLERANCE}: {worst}")


def check_torch(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], precision: str, where: str) -> dict:
    """``compare`` of a torch backend's outputs with onnxruntime fp32's, raising ParityError unless every
    output is within ``TORCH_TOLERANCES[precision]`` and, in fp32, every top-1 agrees. fp16 / bf16 top-1
    agreement is returned, not required: near-tied classes of an untrained model flip within the tolerance
    (``benchmarks/bench_torch_parity.py`` measures it on trained models)."""
    result = compare(got, ref)
    tolerance = TORCH_TOLERANCES[precision]
    bad = {k: v for k, v in result.items() if v["max_abs_diff"] > tolerance
           or (precision == "fp32" and v["top1_agreement"] < 1.0)}
    if bad:
        raise ParityError(f"{where}: {precision} outputs differ from onnxruntime fp32 beyond {tolerance}"
                          f"{' or in top-1' if precision == 'fp32' else ''}: {bad}")
    return result


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy (%) per modality (argmax of p_audio, p_visual, p_av over the K classes)."""
    return {m: float(100 * (outputs[o].argmax(1) == labels).mean()) for m, o in MODALITY_OUTPUTS.items()}


def open_store(settings: dict, data_dir: str | Path | None = None) -> PreparedStore:
    """The prepared store a run trained on (``data_dir`` overrides the run's ``data_dir``)."""
    from cign_train.data.ingest import store_dir
    from cign_train.settings import TrainSettings

    s = TrainSettings.from_dict(settings)
    root = store_dir(Path(data_dir or s.data_dir), s.store_name, s.spec)
    try:
        return PreparedStore(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; export checks parity on the run's test split: pass --data-dir") from e
