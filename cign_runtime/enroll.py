"""Learning a class on the device: a new row of the class-token table, fitted without torch.

CIGN's heads are shared across classes (Sec. 3.2): class i is its token c_i, which phi_a / phi_v
contextualise with the features (eqs 1-2) and the grouping pools around (eqs 5-7); FC(g_i) gives its
probability. A tokens-as-input export serves any table with one graph, so a new class is one more
row. :func:`enroll` fits that row from a few shots and writes a new export version beside the old:

1. each shot (a clip file, or a capture from a camera and a microphone) is decoded with the spec of
   the export and refused when its audio is silent or its frame black (:func:`check_shot`);
2. the export's ``encoders`` graph gives its features f_a, f_v once;
3. the token starts from the old tokens' mean (``init="mean"``; or ``"shots"``, the shots' mean audio and
   visual feature scaled to the old tokens' mean norm), then takes Adam steps on eq 10's BCE terms (or
   the cross-entropy of the inference rule) through the post-encoder part in numpy
   (``cign_runtime.head``). Every other weight and every old token stays as it was; old classes move
   only through the attention of eqs 1-2.
   Each step sees all shots (positives of the new class) and a class-balanced draw of the export's
   exemplar features (``exemplars.npz``, computed at export from val clips), labelled with their
   classes: the rehearsal that keeps the new token from firing on old classes and the old classes'
   logits where they were; the shots weigh ``positive_weight`` of the loss;
4. the grown table, the exemplars plus the new class's shot features, and a manifest naming the class
   (shots, when, hashes of the sources, the fit) are written to ``<export>.r<N>`` through a temporary
   folder renamed at the end, so a version is complete or absent. Unchanged artefacts are hard links.

The defaults of :class:`FitOptions` were chosen on avdigits' val split (``benchmarks/bench_enroll.py
--sweep``): the fewest false accepts on old-class clips, the goals' binding constraint; more weight on
the shots buys new-class accuracy with false accepts. TensorRT engines are not carried over: their optimisation profile bounds the class count, so rebuild
them for the grown table (``docs/cign-enroll.md``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cign_runtime import manifest as mf
from cign_runtime.decode import ClipError, decode_clip
from cign_runtime.head import Head
from cign_runtime.spec import fit_window, log_spectrogram, resize_frame

#: Shots whose audio RMS is below this (dBFS) are refused as silent.
MIN_LEVEL_DBFS = -50.0
#: Shots whose frame's mean value (0-255) is below this are refused as black.
MIN_FRAME_MEAN = 8.0
#: Live capture: shots asked for, and the countdown before each (s).
SHOTS, COUNTDOWN = 5, 3.0
#: How the new token starts (:func:`initial_token`).
INITS = ("shots", "mean")
#: What the token is fitted on: eq 10's BCE terms, or the cross-entropy of the inference rule over ln p_av.
LOSSES = ("bce", "ce")
#: An enrolled version's folder: the lineage's base name, then ``.r`` and its revision.
REVISION = re.compile(r"^(?P<base>.+)\.r(?P<rev>\d+)$")


class EnrollError(ValueError):
    """Input that cannot be enrolled; the message names the file or export and the problem."""


@dataclass(frozen=True)
class FitOptions:
    steps: int = 40
    lr: float = 0.05  # Adam's step size on the token row
    init: str = "mean"  # INITS
    negatives: int = 16  # exemplars per step, drawn class-balanced
    positive_weight: float = 0.1  # share of the loss on the shots (the exemplars have the rest)
    loss: str = "bce"  # LOSSES (cign_runtime.head.Head.loss_and_grad)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.steps < 0 or self.lr <= 0 or self.negatives < 0 or not 0 < self.positive_weight <= 1:
            raise ValueError(f"invalid fit options {self}")


@dataclass
class Shot:
    source: str  # file path, or what captured it
    sha256: str  # of the file, or of the captured frame and audio bytes
    frame: np.ndarray  # (S, S, 3) uint8 RGB at the spec's size
    audio: np.ndarray  # (spec.n_samples,) float32 mono at the spec's rate


def level_dbfs(audio: np.ndarray) -> float:
    """RMS level of ``audio`` in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20 * np.log10(rms) if rms > 0 else float("-inf")


def check_shot(shot: Shot, min_level_dbfs: float = MIN_LEVEL_DBFS, min_frame_mean: float = MIN_FRAME_MEAN) -> None:
    """EnrollError naming the shot when its audio is silent or its frame black."""
    level = level_dbfs(shot.audio)
    if level < min_level_dbfs:
        raise EnrollError(f"{shot.source}: silent shot: audio RMS {level:.1f} dBFS, below {min_level_dbfs:g} dBFS")
    brightness = float(shot.frame.mean())
    if brightness < min_frame_mean:
        raise EnrollError(f"{shot.source}: black frame: mean value {brightness:.1f} of 255, below {min_frame_mean:g}")


def shot_from_file(path: str | os.PathLike, spec) -> Shot:
    """A clip file decoded as ``cign-prepare`` decodes clips (``cign_runtime.decode``)."""
    try:
        clip = decode_clip(path, spec)
    except ClipError as e:
        raise EnrollError(str(e)) from e
    return Shot(str(path), mf.sha256(path), clip.frame, clip.audio)


def shot_from_capture(rgb: np.ndarray, audio: np.ndarray, spec, source: str) -> Shot:
    """A frame (any size, RGB uint8) and the audio window (spec rate) from live devices."""
    frame = resize_frame(spec, rgb)
    audio = fit_window(np.asarray(audio, np.float32), spec.n_samples)
    digest = hashlib.sha256(frame.tobytes() + audio.tobytes()).hexdigest()
    return Shot(source, digest, frame, audio)


@dataclass
class Exemplars:
    """Encoder features of old classes' clips: f_a (M, 1, D), f_v (M, P, D) float16, labels (M,)."""

    f_a: np.ndarray
    f_v: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, path: Path) -> "Exemplars":
        with np.load(path) as z:
            return cls(z["f_a"], z["f_v"], z["labels"].astype(np.int64))

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, f_a=self.f_a.astype(np.float16), f_v=self.f_v.astype(np.float16), labels=self.labels)

    def plus(self, f_a: np.ndarray, f_v: np.ndarray, label: int) -> "Exemplars":
        return Exemplars(np.concatenate([self.f_a, f_a.astype(np.float16)]),
                         np.concatenate([self.f_v, f_v.astype(np.float16)]),
                         np.concatenate([self.labels, np.full(len(f_a), label, np.int64)]))

    def without(self, label: int) -> "Exemplars":
        """Those of other classes, labels above ``label`` moved down by one (its token row is removed)."""
        keep = self.labels != label
        labels = self.labels[keep]
        return Exemplars(self.f_a[keep], self.f_v[keep], labels - (labels > label))


def initial_token(table: np.ndarray, f_a: np.ndarray, f_v: np.ndarray, init: str) -> np.ndarray:
    """The new token before fitting: the old tokens' mean, or the shots' mean feature at their mean norm."""
    if init == "mean":
        return table.mean(0)
    feature = 0.5 * (f_a.mean((0, 1)) + f_v.mean((0, 1)))
    return feature * (np.linalg.norm(table, axis=1).mean() / max(np.linalg.norm(feature), 1e-12))


def balanced_draw(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions of ``labels``, spread over the classes as evenly as they allow (without replacement)."""
    if n >= len(labels):
        return np.arange(len(labels))
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in rng.permutation(np.unique(labels))]
    picked: list[int] = []
    while len(picked) < n:
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return np.sort(np.asarray(picked))


def fit_token(head: Head, table: np.ndarray, f_a: np.ndarray, f_v: np.ndarray, exemplars: Exemplars,
              opt: FitOptions) -> tuple[np.ndarray, dict]:
    """The new class's token (D,) fitted from its shots' features f_a (S, 1, D), f_v (S, P, D)."""
    k = len(table)
    rng = np.random.default_rng(opt.seed)
    token = initial_token(table, f_a, f_v, opt.init).astype(np.float32)
    ex_a, ex_v = exemplars.f_a.astype(np.float32), exemplars.f_v.astype(np.float32)
    s = len(f_a)
    m1, m2 = np.zeros_like(token), np.zeros_like(token)
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses = []
    for step in range(1, opt.steps + 1):
        pick = balanced_draw(exemplars.labels, opt.negatives, rng)
        n = len(pick)
        targets = np.zeros((s + n, k + 1), np.float32)
        targets[:s, k] = 1
        targets[s + np.arange(n), exemplars.labels[pick]] = 1
        weights = np.concatenate([np.full(s, opt.positive_weight / s),
                                  np.full(n, (1 - opt.positive_weight) / max(n, 1))]).astype(np.float32)
        loss, grad, _, _ = head.loss_and_grad(np.concatenate([f_a, ex_a[pick]]), np.concatenate([f_v, ex_v[pick]]),
                                              np.vstack([table, token[None]]), targets, weights, opt.loss)
        g = grad[-1]
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        token = token - opt.lr * (m1 / (1 - b1**step)) / (np.sqrt(m2 / (1 - b2**step)) + eps)
        losses.append(loss)
    return token.astype(np.float32), {"loss_first": losses[0] if losses else None,
                                      "loss_last": losses[-1] if losses else None}


# ------------------------------------------------------------------------------------- versions
def lineage(root: Path) -> tuple[str, int]:
    """(base name, revision) of an export folder: ``x.r3`` -> (``x``, 3); ``x`` -> (``x``, 0)."""
    m = REVISION.match(root.name)
    return (m["base"], int(m["rev"])) if m else (root.name, 0)


def revisions(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """The versions of ``root``'s lineage beside it that have a manifest, oldest first."""
    root = Path(root)
    base, _ = lineage(root)
    found = [(0, root.parent / base)] if (root.parent / base / mf.FILENAME).is_file() else []
    for p in root.parent.glob(f"{glob.escape(base)}.r*"):
        m = REVISION.match(p.name)
        if m and m["base"] == base and (p / mf.FILENAME).is_file():
            found.append((int(m["rev"]), p))
    return sorted(found)


class Export:
    """An export version opened for enrolment: manifest verified, table of its newest task."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.manifest = mf.Manifest.load(self.root)
        except (ValueError, FileNotFoundError) as e:
            raise EnrollError(str(e)) from e
        m = self.manifest
        run = Path(m.checkpoint.get("path", "RUN/task_T.pt")).parent
        remake = f"cign-export --run {run} --task {m.task} --tokens-as-input"
        if not m.tokens_as_input:
            raise EnrollError(f"{self.root}: the class tokens are baked into this export's graph; enrolment needs an "
                              f"export with the token table as an input: {remake}")
        roles = {a.role for a in m.artefacts}
        missing = sorted({"encoders", "head", "exemplars"} - roles)
        if missing:
            raise EnrollError(f"{self.root}: the export lacks {missing}, which enrolment needs; export it again: {remake}")
        self.table = np.load(self.root / m.artefact("tokens", task=m.task).path).astype(np.float32)
        self._head: Head | None = None
        self._encoders = None

    @property
    def head(self) -> Head:
        if self._head is None:
            self._head = Head.load(self.root / self.manifest.artefact("head").path)
        return self._head

    def exemplars(self) -> Exemplars:
        return Exemplars.load(self.root / self.manifest.artefact("exemplars").path)

    def feeds(self, shots: list[Shot]) -> dict[str, np.ndarray]:
        """The graphs' frame and spectrogram inputs of the shots (``manifest.feed``)."""
        spec = self.manifest.spec
        return mf.feed(np.stack([s.frame for s in shots]), np.stack([log_spectrogram(spec, s.audio) for s in shots]))

    def features(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """f_a (S, 1, D), f_v (S, P, D) of :meth:`feeds` from the ``encoders`` graph."""
        import onnxruntime as ort

        if self._encoders is None:
            path = self.root / self.manifest.artefact("encoders").path
            self._encoders = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        f_a, f_v = self._encoders.run(list(mf.FEATURES), feeds)
        return f_a, f_v


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def derive(src: Export, classes: list[str], classes_per_task: list[int], table: np.ndarray, exemplars: Exemplars,
           enrolled: list[dict]) -> Path:
    """Write a new version of ``src`` with this class list, token table and exemplars; returns its folder.

    Written into a hidden temporary folder, verified, then renamed: a version is complete or absent."""
    base, _ = lineage(src.root)
    rev = max([r for r, _ in revisions(src.root)] + [src.manifest.revision]) + 1
    final = src.root.parent / f"{base}.r{rev}"
    tmp = src.root.parent / f".{final.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        artefacts = []
        for a in src.manifest.artefacts:
            if a.role not in ("tokens", "exemplars", "engine"):
                _link(src.root / a.path, tmp / a.path)
                artefacts.append(a)
        for t, end in enumerate(np.cumsum(classes_per_task)):
            path = tmp / f"tokens_task{t}.npy"
            np.save(path, np.ascontiguousarray(table[:end]))
            artefacts.append(mf.Artefact.of(tmp, path, "tokens", task=t))
        exemplars.save(tmp / "exemplars.npz")
        artefacts.append(mf.Artefact.of(tmp, tmp / "exemplars.npz", "exemplars"))
        manifest = dataclasses.replace(
            src.manifest, task=len(classes_per_task) - 1, classes=list(classes), classes_per_task=list(classes_per_task),
            artefacts=artefacts, enrolled=enrolled, revision=rev,
            parent={"path": str(src.root.resolve()), "manifest_sha256": mf.sha256(src.root / mf.FILENAME)})
        manifest.save(tmp)
        mf.Manifest.load(tmp)
        if final.exists():
            raise EnrollError(f"{final}: exists already (another enrolment wrote it meanwhile); try again")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_name(manifest: mf.Manifest, name: str) -> None:
    if not name or not name.strip() or any(c in name for c in "\n\r\t"):
        raise EnrollError(f"class name {name!r} is empty or has control characters")
    if name in manifest.classes:
        raise EnrollError(f"class {name!r} exists already in this export (cign-enroll --list; --rename or --remove it first)")


def recheck(src: Export, table: np.ndarray, feeds: dict, head_p_av: np.ndarray, new: int) -> dict:
    """The export's graphs run on the shots with the grown table: share of shots whose p_av top-1 is the new class,
    and |p_av - the numpy head's| (fp32: must agree, else the head and the graph are not one model)."""
    import onnxruntime as ort

    out = {}
    for a in src.manifest.artefacts:
        if a.role != "onnx":
            continue
        session = ort.InferenceSession(str(src.root / a.path), providers=["CPUExecutionProvider"])
        p_av = session.run(["p_av"], {**feeds, mf.TOKENS: table})[0]
        out[a.precision] = {"shots_top1_new": float((p_av.argmax(1) == new).mean()),
                            "max_abs_vs_head": float(np.abs(p_av - head_p_av).max())}
    if out.get("fp32", {}).get("max_abs_vs_head", 0.0) > 1e-3:
        raise EnrollError(f"{src.root}: the fp32 graph and head.npz disagree on the shots by "
                          f"{out['fp32']['max_abs_vs_head']:.2e}; the export is inconsistent (export it again)")
    return out


def enroll(root: str | os.PathLike, name: str, shots: list[Shot], opt: FitOptions = FitOptions()) -> tuple[Path, dict]:
    """Fit class ``name`` from ``shots`` (checked already) and write the new version; (its folder, the fit report)."""
    t0 = time.perf_counter()
    src = Export(root)
    check_name(src.manifest, name)
    if not shots:
        raise EnrollError(f"{root}: no usable shot of {name!r}")
    feeds = src.feeds(shots)  # decoded once: the encoders' input here, the graphs' in recheck
    f_a, f_v = src.features(feeds)
    t1 = time.perf_counter()
    exemplars = src.exemplars()
    token, fit = fit_token(src.head, src.table, f_a, f_v, exemplars, opt)
    t2 = time.perf_counter()
    table = np.vstack([src.table, token[None]]).astype(np.float32)
    k = len(src.table)
    za, zv = src.head.logits(f_a, f_v, table)
    p_av = 1 / (1 + np.exp(-za)) / (1 + np.exp(-zv))
    checks = recheck(src, table, feeds, p_av, k)
    record = {"name": name, "shots": len(shots), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "sources": [{"source": s.source, "sha256": s.sha256} for s in shots],
              "fit": {**dataclasses.asdict(opt), **fit, "seconds": round(t2 - t1, 3), "encode_seconds": round(t1 - t0, 3)},
              "checks": checks}
    m = src.manifest
    out = derive(src, m.classes + [name], m.classes_per_task + [1], table, exemplars.plus(f_a, f_v, k),
                 m.enrolled + [record])
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return out, record


def remove(root: str | os.PathLike, name: str) -> Path:
    """A new version without class ``name``: its token row, exemplars and enrolment record go."""
    src = Export(root)
    m = src.manifest
    if name not in m.classes:
        raise EnrollError(f"{root}: no class {name!r}; it has {m.classes}")
    if len(m.classes) == 1:
        raise EnrollError(f"{root}: {name!r} is the only class; an export needs one")
    i = m.classes.index(name)
    task = int(np.searchsorted(np.cumsum(m.classes_per_task), i, side="right"))
    per_task = list(m.classes_per_task)
    per_task[task] -= 1
    return derive(src, [c for c in m.classes if c != name], [n for n in per_task if n],
                  np.delete(src.table, i, axis=0), src.exemplars().without(i),
                  [e for e in m.enrolled if e["name"] != name])


def rename(root: str | os.PathLike, old: str, new: str) -> Path:
    src = Export(root)
    m = src.manifest
    if old not in m.classes:
        raise EnrollError(f"{root}: no class {old!r}; it has {m.classes}")
    check_name(m, new)
    classes = [new if c == old else c for c in m.classes]
    enrolled = [{**e, "name": new} if e["name"] == old else e for e in m.enrolled]
    return derive(src, classes, list(m.classes_per_task), src.table, src.exemplars(), enrolled)


def describe(root: str | os.PathLike) -> str:
    """``--list``: the classes of a version, which were enrolled (shots, when), and the lineage's versions."""
    m = mf.Manifest.load(root)
    enrolled = {e["name"]: e for e in m.enrolled}
    lines = [f"{root} (revision {m.revision}): {len(m.classes)} classes"]
    for k, c in enumerate(m.classes):
        e = enrolled.get(c)
        lines.append(f"  {k:3d} {c}" + (f"  enrolled {e['created']} from {e['shots']} shots" if e else "  trained"))
    lines.append("versions: " + ", ".join(f"r{r} {p.name}" for r, p in revisions(root)))
    return "\n".join(lines)


@dataclass
class ShotReport:
    """What happened to each offered shot (``cign-enroll`` prints it): accepted sources and refusals."""

    accepted: list[Shot] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def load_shots(paths, spec, min_level_dbfs: float = MIN_LEVEL_DBFS, min_frame_mean: float = MIN_FRAME_MEAN) -> ShotReport:
    """Decode and check every clip; a bad one is refused with its reason and the others are kept."""
    report = ShotReport()
    for p in paths:
        try:
            shot = shot_from_file(p, spec)
            check_shot(shot, min_level_dbfs, min_frame_mean)
        except EnrollError as e:
            report.refused.append(str(e))
            continue
        report.accepted.append(shot)
    return report


def capture_shots(video, audio, spec, n: int, countdown: float, emit, min_level_dbfs: float = MIN_LEVEL_DBFS,
                  min_frame_mean: float = MIN_FRAME_MEAN, max_attempts: int | None = None, stopped=None) -> list[Shot]:
    """Guided capture from started sources (``cign_runtime.video`` / ``cign_runtime.audio``): per shot a prompt
    with a countdown, then ``spec.clip_seconds`` of recording, then the newest frame and audio window. Each
    event goes to ``emit`` (a dict: prompt, recording, shot with its audio level and frame mean, refused with
    the reason); a refused shot is retaken, up to ``max_attempts`` (default 3 n) in all. ``stopped``: an
    optional ``threading.Event`` that abandons the capture."""
    shots: list[Shot] = []
    attempts = 0
    limit = 3 * n if max_attempts is None else max_attempts

    def interrupted(seconds: float) -> bool:
        if stopped is None:
            time.sleep(seconds)
            return False
        return stopped.wait(seconds)

    while len(shots) < n:
        if attempts >= limit:
            raise EnrollError(f"capture: {attempts} shots taken, {len(shots)} usable of the {n} asked; "
                              "check the camera and microphone (the refusals say why)")
        attempts += 1
        i = len(shots) + 1
        emit({"event": "prompt", "shot": i, "of": n, "countdown_s": countdown})
        if interrupted(countdown):
            raise EnrollError("capture: stopped")
        emit({"event": "recording", "shot": i, "of": n, "seconds": spec.clip_seconds})
        if interrupted(spec.clip_seconds):
            raise EnrollError("capture: stopped")
        window, _ = audio.window()
        frame = video.latest()
        if frame is None:
            emit({"event": "refused", "shot": i, "reason": "no camera frame yet"})
            continue
        shot = shot_from_capture(frame.rgb, window, spec, f"capture {attempts} (shot {i} of {n})")
        info = {"shot": i, "level_dbfs": round(level_dbfs(shot.audio), 1), "frame_mean": round(float(shot.frame.mean()), 1)}
        try:
            check_shot(shot, min_level_dbfs, min_frame_mean)
        except EnrollError as e:
            emit({"event": "refused", **info, "reason": str(e)})
            continue
        emit({"event": "shot", **info, "sha256": shot.sha256})
        shots.append(shot)
    return shots
