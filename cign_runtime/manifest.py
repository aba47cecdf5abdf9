"""The export manifest (``manifest.json``): the one contract between ``cign-export`` and the runtime.

It names every artefact of an export folder with its sha256 (ONNX graphs per precision, TensorRT
engines, token tables, the trtexec recipe) and says how to feed the graphs: input and output
names, shapes and dtypes, the preprocessing spec, classes in task order, the confidence
calibration. :meth:`Manifest.load` verifies every hash, so a changed or mismatched file is refused
with its name. Torch-free: the runtime on a Jetson reads it with the standard library and numpy.

Graph inputs (the same for every precision; the normalisation of ``cign_runtime.spec`` is inside
the graph, see ``cign_export.graph``):

- ``frame``: float32 (N, 3, H, W), RGB in [0, 255], resized (not cropped) to the spec's frame size;
- ``spectrogram``: float32 (N, 1, F, T), ln(|STFT|^2 + eps) of the spec's analysis window;
- ``tokens`` (tokens-as-input exports only): float32 (K, D), one task's class-token table.

Outputs: ``p_audio``, ``p_visual``, ``p_av`` float32 (N, K), with p_av = p_audio * p_visual (Sec. 3.3).

``profile`` records the shape range the TensorRT engines are built for ({input: [min, opt, max]}), which
onnxruntime's TensorRT provider is given too (:meth:`Manifest.shape_profile`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cign_runtime.records import known_fields
from cign_runtime.spec import PreprocessSpec

FORMAT = "cign-export"
VERSION = 1
FILENAME = "manifest.json"

FRAME, SPECTROGRAM, TOKENS = "frame", "spectrogram", "tokens"
OUTPUTS = ("p_audio", "p_visual", "p_av")
#: Outputs of the ``encoders`` graph: f_a (N, 1, D) and f_v (N, P, D), the inputs of eqs 1-2.
FEATURES = ("f_audio", "f_visual")
#: Graph precisions an export can hold: fp32 always; fp16 (fp32 inputs/outputs); INT8 Q/DQ for
#: TensorRT (symmetric, zero points 0) or for onnxruntime's CPU kernels (u8 activations).
PRECISIONS = ("fp32", "fp16", "int8-trt", "int8-cpu")
#: onnxruntime graph optimizations a session must leave off per precision: the int8-trt graph's float16
#: Q/DQ scales make WeightBiasQuantization requantize its float biases in float16, which overflows
#: (``calibration.quantize``).
DISABLED_OPTIMIZERS = {"int8-trt": ("WeightBiasQuantization",)}
#: What each artefact role means; ``Artefact.role`` is one of these. ``encoders``, ``head`` and
#: ``exemplars`` are what on-device enrolment needs (``cign_export.enrolment``, ``cign_runtime.enroll``).
ROLES = ("onnx", "engine", "tokens", "trtexec", "report", "encoders", "head", "exemplars")
#: Largest batch of the shape range that :meth:`Manifest.shape_profile` assumes for a manifest that records none
#: (``cign-export --max-batch``'s default).
DEFAULT_MAX_BATCH = 8

NORMALIZATION = (
    "inside the graph: frame / 255, minus spec.frame_mean, over spec.frame_std (per RGB channel); "
    "(spectrogram - spec.spec_mean) / spec.spec_std. Feed raw RGB values and raw log power."
)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list  # ints, or names of dynamic axes ("batch", "classes")
    dtype: str  # numpy dtype name
    description: str = ""


@dataclass(frozen=True)
class Artefact:
    """One file of the export folder, by its path relative to the folder."""

    path: str
    sha256: str
    role: str
    precision: str | None = None  # onnx / engine: one of PRECISIONS
    task: int | None = None  # tokens: the task whose table this is
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"artefact {self.path}: role {self.role!r} is not one of {ROLES}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"artefact {self.path}: precision {self.precision!r} is not one of {PRECISIONS}")

    @classmethod
    def of(cls, root: Path, path: Path, role: str, **kw) -> "Artefact":
        """Describe ``path`` (inside ``root``) with its current hash and size."""
        path = Path(path)
        return cls(path.relative_to(root).as_posix(), sha256(path), role, bytes=path.stat().st_size, **kw)


@dataclass(frozen=True)
class Confidence:
    """Calibration of p_av fitted on the validation split (``calibration.confidence``).

    The runtime scores q = softmax(ln p_av / temperature) over the classes and answers "no known
    source" when max q < threshold (``cign_runtime.confidence``).
    """

    temperature: float = 1.0
    threshold: float = 0.0
    fitted_on: str = "val"
    rule: str = ""  # how the threshold was chosen
    metrics: dict = field(default_factory=dict)  # ECE before/after, coverage, ... on val and test


@dataclass(frozen=True)
class Manifest:
    task: int  # 0-based task whose classes the default token table covers
    classes: list[str]  # model class k's name, in task order
    classes_per_task: list[int]
    spec: PreprocessSpec
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opset: int
    tokens_as_input: bool
    artefacts: list[Artefact]
    checkpoint: dict  # {"path": str, "sha256": str} of the source task checkpoint (not verified at load)
    confidence: Confidence = field(default_factory=Confidence)
    enrolled: list[dict] = field(default_factory=list)  # classes learned on the device (cign_runtime.enroll.Enrolled)
    revision: int = 0  # 0: written by cign-export; n: the n-th version cign-enroll derived from it
    parent: dict | None = None  # {"path", "manifest_sha256"} of the version this one was derived from
    profile: dict | None = None  # {input name: [min, opt, max] shapes}: the engines' shape range (shape_profile)
    normalization: str = NORMALIZATION
    created_by: str = ""  # exporter and library versions
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT or self.version != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} manifest (got {self.format} v{self.version})")
        if sum(self.classes_per_task) != len(self.classes):
            raise ValueError(f"classes_per_task {self.classes_per_task} does not add up to {len(self.classes)} classes")
        ranks = {t.name: len(t.shape) for t in self.inputs}
        for name, shapes in (self.profile or {}).items():
            if name not in ranks or len(shapes) != 3 or any(len(s) != ranks[name] for s in shapes):
                raise ValueError(f"profile of {name!r} is not [min, opt, max] shapes of one of the inputs {ranks} "
                                 f"(name: rank): {shapes}")

    # ----------------------------------------------------------------------------- queries
    def artefact(self, role: str, precision: str | None = None, task: int | None = None) -> Artefact:
        """The one artefact of ``role`` (and ``precision`` / ``task``); KeyError listing what there is."""
        found = [a for a in self.artefacts if a.role == role and (precision is None or a.precision == precision)
                 and (task is None or a.task == task)]
        if len(found) != 1:
            have = [(a.role, a.precision, a.task) for a in self.artefacts]
            raise KeyError(f"no single {role} artefact for precision={precision} task={task}; the export has {have}")
        return found[0]

    def precisions(self, role: str = "onnx") -> list[str]:
        return [a.precision for a in self.artefacts if a.role == role]

    def n_classes(self, task: int | None = None) -> int:
        """K after ``task`` (default: the manifest's task)."""
        return sum(self.classes_per_task[: (self.task if task is None else task) + 1])

    def shape_profile(self) -> dict[str, list[list[int]]]:
        """{input name: [min, opt, max] shape} of every input: the range the engines were built for.

        The recorded ``profile``; for a manifest without one, cign-export's defaults derived from the
        inputs: batch 1 / 1 / ``DEFAULT_MAX_BATCH`` and classes (tokens as input) first task's / all / all
        (not what the engines hold if the export had another ``--max-batch``). The classes axis reaches at
        least this version's class count, so a version with enrolled classes fits.
        """
        k_first, k = self.classes_per_task[0], len(self.classes)
        axes = {"batch": (1, 1, DEFAULT_MAX_BATCH), "classes": (k_first, k, k)}
        out = {}
        for info in self.inputs:
            recorded = (self.profile or {}).get(info.name)
            if recorded is None:
                unknown = [d for d in info.shape if isinstance(d, str) and d not in axes]
                if unknown:
                    raise ValueError(f"input {info.name}: no recorded profile and unknown dynamic axes {unknown}")
                recorded = [[d if isinstance(d, int) else axes[d][i] for d in info.shape] for i in range(3)]
            shapes = [[int(d) for d in s] for s in recorded]
            for j, d in enumerate(info.shape):
                if d == "classes":
                    shapes[2][j] = max(shapes[2][j], k)
            out[info.name] = shapes
        return out

    def with_engine(self, root: str | os.PathLike, plan: str | os.PathLike, precision: str) -> "Manifest":
        """This manifest plus an engine built on the device (e.g. by ``trtexec.sh``) with its sha256.

        An engine already listed at the same path or for the same precision is replaced; ``plan`` must lie
        inside ``root``. The caller checks that the engine loads (``cign-live --register-engine``) and saves.
        """
        root, plan = Path(root).resolve(), Path(plan).resolve()
        if not plan.is_file():
            raise FileNotFoundError(f"{plan}: no such engine file")
        if root not in plan.parents:
            raise ValueError(f"{plan}: an engine must lie inside the export folder {root}")
        engine = Artefact.of(root, plan, "engine", precision=precision)
        kept = [a for a in self.artefacts if a.path != engine.path and not (a.role == "engine" and a.precision == precision)]
        return dataclasses.replace(self, artefacts=kept + [engine])

    # ------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(known_fields(cls, d, "manifest"))
        d["spec"] = PreprocessSpec.from_dict(d["spec"])
        d["inputs"] = [TensorInfo(**known_fields(TensorInfo, t, "tensor")) for t in d["inputs"]]
        d["outputs"] = [TensorInfo(**known_fields(TensorInfo, t, "tensor")) for t in d["outputs"]]
        d["artefacts"] = [Artefact(**known_fields(Artefact, a, "artefact")) for a in d["artefacts"]]
        d["confidence"] = Confidence(**known_fields(Confidence, d.get("confidence", {}), "confidence"))
        return cls(**d)

    def save(self, root: Path) -> Path:
        path = Path(root) / FILENAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | os.PathLike, verify: bool = True) -> "Manifest":
        """Read ``root/manifest.json``; with ``verify``, refuse any artefact whose bytes changed."""
        root = Path(root)
        path = root / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no export manifest here (run cign-export)")
        try:
            manifest = cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e
        if verify:
            manifest.verify(root)
        return manifest

    def verify(self, root: Path) -> None:
        """Raise ValueError naming every artefact that is missing or whose sha256 differs."""
        bad = []
        for a in self.artefacts:
            f = Path(root) / a.path
            if not f.is_file():
                bad.append(f"{f}: missing")
            elif sha256(f) != a.sha256:
                bad.append(f"{f}: sha256 differs from the manifest's (file changed or from another export)")
        if bad:
            raise ValueError(f"{Path(root) / FILENAME} refused: " + "; ".join(bad))


def feed(frames_u8: np.ndarray, log_spectrograms: np.ndarray, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Frames (N, H, W, 3) uint8 RGB at the spec's size and log spectrograms (N, F, T) -> the graphs' inputs."""
    d = {
        FRAME: np.ascontiguousarray(np.asarray(frames_u8, dtype=np.float32).transpose(0, 3, 1, 2)),
        SPECTROGRAM: np.ascontiguousarray(np.asarray(log_spectrograms, dtype=np.float32)[:, None]),
    }
    if tokens is not None:
        d[TOKENS] = np.ascontiguousarray(tokens, dtype=np.float32)
    return d
