"""The paper's experiments (Tables 1-5, Figures 3-4) as sweeps of ``cign-train`` runs over seeds.

Each experiment is a list of rows; a row is a method with settings that differ from the training
preset's (a model field such as ``depth``, or a run setting such as ``tasks``). Every (row, seed)
is one run in ``RUNS/STORE-PRESET/RUN-seedS``, where RUN names the method and the settings that
differ from the preset's (``cign``, ``cign+depth=3``, ``finetune+tasks=10``), so rows with equal
settings share a run across experiments and a finished run is never trained twice. An interrupted
run resumes from its ``last.pt``: a killed sweep continues where it stopped.

Protocol: every run is scored on val while it trains (the split settings are chosen on), then its
task checkpoints are re-scored on test for reporting (``Trainer.rescore``, cached in the run
folder as ``metrics_test.json``). Tables give mean +- std over the seeds whose runs are finished.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
from matplotlib.ticker import MaxNLocator

from cign_train import checkpoint as ck
from cign_train.data.ingest import ensure_avdigits
from cign_train.data.loader import batch_loader
from cign_train.evaluate import MODALITIES
from cign_train.settings import OPERATIONAL, TrainSettings, preset_settings
from cign_train.trainer import Trainer, make_plan

MODALITY_NAMES = {"audio": "Audio", "visual": "Visual", "audio_visual": "Audio-Visual"}
#: The paper's pair (L2P's definitions, docs/cign-train.md "Metrics") and the other summaries, per modality.
PAPER_COLUMNS = ("average_accuracy_l2p", "forgetting_l2p")
ALL_COLUMNS = ("average_accuracy", "average_accuracy_l2p", "final_accuracy", "diagonal_mean", "diagonal_min",
               "forgetting_avcil", "forgetting_facil", "forgetting_l2p")
TEST_METRICS = "metrics_test.json"


@dataclass(frozen=True)
class Row:
    """One line of a table: ``method`` with ``model`` (CIGNConfig fields) and ``settings``
    (TrainSettings fields) overriding the preset's."""

    key: str  # short id, for --rows
    label: str  # as printed in the table
    method: str = "cign"
    model: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    rows: tuple[Row, ...]
    figure: str = "seen"  # "seen": seen-class accuracy per task; "buffer": Figure 4; "tsne": Figure 3
    #: TensorBoard scalars summarised per run (median over the logged steps), e.g. for Table 4.
    diagnostics: tuple[str, ...] = ()


BASELINES = (("ewc", "EWC"), ("lwf", "LwF"), ("icarl", "iCaRL"), ("il2m", "IL2M"), ("bic", "BiC"), ("podnet", "PODNet"),
             ("ss_il", "SS-IL"), ("l2p", "L2P"), ("dualprompt", "DualPrompt"))
#: Each with the settings its paper prescribes beyond its loss (``Method.SETTINGS``, e.g. iCaRL's herding).
BASELINE_ROWS = tuple(Row(k, label, k) for k, label in BASELINES)
FINETUNE = Row("finetune", "Fine-tuning (lower bound)", "finetune")
JOINT = Row("joint", "Joint training (upper bound)", "joint")
CIGN_ROW = Row("cign", "CIGN (ours)")
#: Table 4's paper-literal readings of eqs 8-9 (docs/paper-choices.md).
LITERAL = {"token_source": "table", "ctl_negatives": "label", "ctl_denominator": "paper", "teacher_bn": "running"}
DEPTHS = (1, 3, 6, 12)
BUFFERS = (10, 20, 30, 40, 50)
#: Task counts of the task-count experiment (the paper: 4 x 25 and 10 x 10 on VGGSound-100); a count
#: that does not divide a data set's classes is skipped (avdigits' 10 classes: 2, 5 and 10).
TASK_COUNTS = (2, 4, 5, 10)
#: Figure 3's baseline panels beside CIGN's: the paper's LwF, BiC and L2P.
TSNE_METHODS = ("lwf", "bic", "l2p")
#: Each reading of eqs 8-9 (docs/paper-choices.md) flipped alone from the default: (field, other value, label).
READINGS = (("token_source", "table", "eq 8 on the raw token table"),
            ("ctl_negatives", "label", "eq 9's negative at its own label"),
            ("ctl_denominator", "paper", "eq 9's denominator: negatives only"),
            ("teacher_bn", "running", "teacher BatchNorm on running statistics"))
#: Eq 9's tau and eq 8's KL temperature swept around the defaults (0.07, 1); the paper gives neither.
TAUS = (0.03, 0.2, 0.5)
KL_TEMPERATURES = (0.5, 2.0)
#: Exemplars per class where replay is scarce, and the preset's 50 (the same runs as the default rows).
SCARCE_BUFFERS = (5, 10, 20, 50)
REPLAY = Row("replay", "replay only (no AVCTD, no AVCG)", model={"use_avctd": False, "use_avcg": False})
#: The best baseline of Tables 1-3 on val (IL2M: audio-visual Average Acc 89.7 ± 1.0, seeds 0-2,
#: experiment_methods_avdigits.json), set against CIGN and replay alone.
BEST_BASELINE = Row("il2m", "IL2M (best baseline on val)", "il2m")


def scarce_rows(suffix: str, label: str, **settings: Any) -> tuple[Row, ...]:
    """Replay alone, CIGN and the best baseline with the same run ``settings``."""
    return tuple(dataclasses.replace(r, key=f"{r.key}-{suffix}", label=f"{r.label}, {label}", settings=settings)
                 for r in (REPLAY, CIGN_ROW, BEST_BASELINE))

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("methods", "Tables 1-3: every method",
               (FINETUNE, *BASELINE_ROWS, CIGN_ROW, JOINT)),
    Experiment("ablation", "Table 4: what CIGN's modules add", (
        FINETUNE,
        REPLAY,
        Row("avctd", "+ AVCTD (eq 8's token terms)", model={"use_avcg": False}),
        Row("avcg", "+ AVCG (eq 9)", model={"use_avctd": False}),
        Row("both", "+ AVCTD + AVCG (CIGN)"),
        Row("literal", "CIGN, paper-literal eqs 8-9", model=LITERAL),
        JOINT,
    ), diagnostics=("loss/kl", "loss/ce", "loss/ctl", "diag/ctl_p_pos_a", "diag/ctl_p_pos_v", "diag/ctl_cos_pos_a",
                    "diag/ctl_cos_neg_a", "diag/grad_ratio_kl", "diag/grad_ratio_ce", "diag/grad_ratio_ctl",
                    "diag/teacher_student_cos_a", "diag/teacher_student_cos_v")),
    Experiment("readings", "Eqs 8-9's readings, one at a time", (
        CIGN_ROW,
        *(Row(f"{k}={v}", f"CIGN, {label}", model={k: v}) for k, v, label in READINGS),
        Row("literal", "CIGN, paper-literal eqs 8-9", model=LITERAL),
        REPLAY,
    ), diagnostics=("loss/kl", "loss/ctl", "diag/ctl_p_pos_a", "diag/ctl_p_pos_v", "diag/teacher_student_cos_a",
                    "diag/teacher_student_cos_v")),
    Experiment("scales", "Eq 9's tau and eq 8's KL temperature", (
        Row("cign", "CIGN (tau 0.07, KL temperature 1)"),
        *(Row(f"tau={t}", f"CIGN, tau {t}", model={"tau": t}) for t in TAUS),
        *(Row(f"kl_temperature={t}", f"CIGN, KL temperature {t}", model={"kl_temperature": t}) for t in KL_TEMPERATURES),
    ), diagnostics=("loss/kl", "loss/ctl", "diag/ctl_p_pos_a", "diag/ctl_p_pos_v", "diag/ctl_own_slot_a",
                    "diag/ctl_own_slot_v")),
    Experiment("scarce", "Where replay is scarce: few exemplars, many tasks", (
        *(r for b in SCARCE_BUFFERS for r in scarce_rows(f"b{b}", f"{b} per class", buffer_per_class=b)),
        *scarce_rows("t10", "10 tasks", tasks=10),
    )),
    Experiment("compare", "CIGN against replay alone and the best baseline", (REPLAY, CIGN_ROW, BEST_BASELINE)),
    Experiment("depth", "Table 5: transformer depth and grouping assignment", (
        *(Row(f"depth{d}", f"depth {d}, Softmax", model={"depth": d}) for d in DEPTHS),
        Row("hard", "Hard-Softmax (Gumbel), the preset's depth", model={"assign": "hard"}),
    )),
    Experiment("tasks", "Number of incremental tasks", tuple(
        Row(f"{m}-{n}", f"{label}, {n} tasks", m, settings={"tasks": n})
        for n in TASK_COUNTS for m, label in (("finetune", "Fine-tuning"), ("cign", "CIGN")))),
    Experiment("buffer", "Figure 4: exemplars per class",
               tuple(Row(f"buffer{b}", f"CIGN, {b} per class", settings={"buffer_per_class": b}) for b in BUFFERS),
               figure="buffer"),
    Experiment("tsne", "Figure 3: t-SNE of the first task's classes after the last task",
               (*(r for r in BASELINE_ROWS if r.key in TSNE_METHODS), Row("cign", "CIGN")), figure="tsne"),
)}


# ----------------------------------------------------------------------------- runs
def run_name(settings: TrainSettings, preset: str, tasks: int | None = None) -> str:
    """The method plus ``+field=value`` for each result-changing setting that differs from the preset's
    (a task count equal to the data set's default, or to ``tasks``, the sweep's own for a csv store,
    counts as the default), sorted."""
    base = preset_settings(preset, method=settings.method, seed=settings.seed, dataset=settings.dataset,
                           name=settings.name, data_dir=settings.data_dir, eval_split=settings.eval_split, tasks=tasks)
    diff = {k: v for k, v in settings.model.to_dict().items() if getattr(base.model, k) != v}
    diff |= {f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)
             if f.name not in ("model", *OPERATIONAL) and getattr(settings, f.name) != getattr(base, f.name)}
    if "tasks" in diff and n_tasks(settings) == n_tasks(base):
        del diff["tasks"]
    return settings.method + "".join(f"+{k}={v}" for k, v in sorted(diff.items()))


def row_settings(row: Row, preset: str, seed: int, dataset: str, name: str | None, data_dir: str,
                 tasks: int | None = None, **operational: Any) -> TrainSettings:
    """The preset with the row's overrides, scored on val while training; ``tasks``: the task count of
    rows that set none (a csv store has no default). ``operational``: device, amp, workers (device and
    amp change results, so a run made with other ones has another name)."""
    s = preset_settings(preset, method=row.method, seed=seed, dataset=dataset, name=name, data_dir=data_dir,
                        eval_split="val", **({"tasks": tasks} | dict(row.settings)), **operational)
    return dataclasses.replace(s, model=dataclasses.replace(s.model, **row.model))


def n_tasks(settings: TrainSettings) -> int:
    """Tasks of the run; a ValueError when the row's task count does not divide the store's classes."""
    return len(make_plan(settings).task_classes)


def run_dir(runs: Path, settings: TrainSettings, preset: str, tasks: int | None = None) -> Path:
    return runs / f"{settings.store_name}-{preset}" / f"{run_name(settings, preset, tasks)}-seed{settings.seed}"


def finished(path: Path, settings: TrainSettings) -> bool:
    """Whether every task of the run is done; a ValueError when it was trained on another spec than the
    store's (:func:`cign_train.checkpoint.check_spec`), so a stale run is never re-read into a table."""
    plan = make_plan(settings)
    n = len(plan.task_classes)
    if ck.last_finished_task(path, n) != n - 1:
        return False
    last = ck.task_path(path, n - 1)
    ck.check_spec(last, ck.TaskCheckpoint.load(last).spec, plan.store.spec)
    return True


def train(settings: TrainSettings, path: Path, progress: bool = False) -> float:
    """Train (or resume, or re-read) the run; seconds spent."""
    start = time.perf_counter()
    Trainer(settings, path, progress=progress).run(resume=(path / "config.json").is_file())
    return time.perf_counter() - start


def run_metrics(settings: TrainSettings, path: Path) -> dict[str, dict]:
    """{"val": metrics.json, "test": the checkpoints re-scored on test} of a finished run (test cached)."""
    test_path = path / TEST_METRICS
    if not test_path.is_file():
        test_path.write_text(json.dumps(Trainer(settings, path, progress=False).rescore("test"), indent=1))
    return {"val": json.loads((path / "metrics.json").read_text()), "test": json.loads(test_path.read_text())}


def run_diagnostics(path: Path, tags: Sequence[str]) -> dict[str, float]:
    """Median over the run's logged steps of each TensorBoard scalar in ``tags`` (absent ones left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    have = set(events.Tags()["scalars"])
    return {t: statistics.median(e.value for e in events.Scalars(t)) for t in tags if t in have}


# ----------------------------------------------------------------------------- summaries
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[dict], split: str) -> dict[str, dict]:
    """Mean and std over seeds of each of ALL_COLUMNS, the diagonal and the seen-class accuracy after
    each task, per modality."""
    out = {}
    for m in MODALITIES:
        ms = [r["metrics"][split] for r in runs]
        out[m] = {
            "average_accuracy": mean_std([r["average_accuracy"][m] for r in ms]),
            "average_accuracy_l2p": mean_std([r["average_accuracy_l2p"][m] for r in ms]),
            "final_accuracy": mean_std([r["final_accuracy"][m] for r in ms]),
            "diagonal_mean": mean_std([statistics.fmean(r["diagonal"][m]) for r in ms]),
            "diagonal_min": mean_std([min(r["diagonal"][m]) for r in ms]),
            "diagonal": [mean_std(d) for d in zip(*(r["diagonal"][m] for r in ms))],
            "seen_accuracy": [mean_std(s) for s in zip(*(r["seen_accuracy"][m] for r in ms))],
            **{f"forgetting_{k}": mean_std([r["forgetting"][m][k] for r in ms]) for k in ("avcil", "facil", "l2p")},
        }
    return out


def cell(v: Sequence[float], seeds: int, digits: int = 1) -> str:
    """mean ± std; the mean alone for one seed (its std of 0 would claim a spread never measured)."""
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if seeds > 1 else f"{v[0]:.{digits}f}"


def paper_table(rows: Mapping[str, dict], split: str) -> str:
    """Markdown in the layout of the paper's Tables 1-5: Average Acc and Forgetting (L2P's definitions)
    per modality, mean ± std over the seeds."""
    head = "".join(f" {MODALITY_NAMES[m]} Avg Acc ↑ | {MODALITY_NAMES[m]} Forgetting ↓ |" for m in MODALITIES)
    lines = ["| Method |" + head + " seeds |", "| --- |" + " ---: | ---: |" * len(MODALITIES) + " ---: |"]
    for entry in rows.values():
        s, n = entry["summary"][split], len(entry["runs"])
        cells = "".join(f" {cell(s[m][PAPER_COLUMNS[0]], n)} | {cell(s[m][PAPER_COLUMNS[1]], n)} |" for m in MODALITIES)
        lines.append(f"| {entry['label']} |{cells} {len(entry['runs'])} |")
    return "\n".join(lines) + "\n"


def full_table(rows: Mapping[str, dict], split: str, modality: str = "audio_visual") -> str:
    """Markdown of every summary column for one modality (docs/cign-train.md "Metrics" defines each)."""
    lines = ["| Method | " + " | ".join(c.replace("_", " ") for c in ALL_COLUMNS) + " |",
             "| --- |" + " ---: |" * len(ALL_COLUMNS)]
    for entry in rows.values():
        s = entry["summary"][split][modality]
        lines.append(f"| {entry['label']} | " + " | ".join(cell(s[c], len(entry["runs"])) for c in ALL_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def plot_seen(rows: Mapping[str, dict], split: str, path: Path, title: str) -> None:
    """Audio-visual accuracy on the classes seen so far after each task, mean ± std over seeds, per row."""
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    colors = colormaps["tab20"] if len(rows) > 10 else colormaps["tab10"]
    for i, entry in enumerate(rows.values()):
        curve = np.array(entry["summary"][split]["audio_visual"]["seen_accuracy"])
        x = np.arange(1, len(curve) + 1)
        ax.errorbar(x, curve[:, 0], yerr=curve[:, 1], marker="o", capsize=3, label=entry["label"], color=colors(i))
    ax.set(xlabel="tasks learned", ylabel=f"audio-visual accuracy on seen classes, {split} (%)", title=title, ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_buffer(rows: Mapping[str, dict], split: str, path: Path, title: str) -> None:
    """Figure 4: Average Acc (left) and Forgetting (right) against exemplars per class, per modality."""
    sizes = [entry["run_settings"]["buffer_per_class"] for entry in rows.values()]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, column, name in zip(axes, PAPER_COLUMNS, ("Average Acc (%)", "Forgetting (%)")):
        for m in MODALITIES:
            v = np.array([entry["summary"][split][m][column] for entry in rows.values()])
            ax.errorbar(sizes, v[:, 0], yerr=v[:, 1], marker="o", capsize=3, label=MODALITY_NAMES[m])
        ax.set(xlabel="exemplars per class", ylabel=f"{name}, {split}", xticks=sizes)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def first_task_features(settings: TrainSettings, path: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The last task's model's encoder features (``CIGN.encoder_features``: f_a and the patch-averaged
    f_v, each L2-normalised, concatenated) of the first task's ``split`` clips, and their labels. The
    encoders are what every method here shares, so the panels compare like with like."""
    trainer = Trainer(settings, path, progress=False)
    saved = ck.TaskCheckpoint.load(ck.task_path(path, n_tasks(settings) - 1))
    model = saved.build_model().eval()
    feats, labels = [], []
    idx = trainer.plan.split_indices(split, trainer.plan.task_classes[0])
    for batch in batch_loader(trainer.plan.store, idx, settings.batch_size, shuffle=False, workers=0):
        x = trainer.inputs(batch)
        f_a, f_v = model.encoder_features(x.spectrograms, x.frames)
        feats.append(torch.cat([torch.nn.functional.normalize(f.float(), dim=-1) for f in (f_a, f_v)], dim=1))
        labels.append(x.labels)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def class_silhouette(feats: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's silhouette score of ``feats`` by class (cosine, before t-SNE): the number a panel shows."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(feats, labels, metric="cosine"))


def tsne_panels(panels: Sequence[tuple[str, np.ndarray, np.ndarray, float]], class_names: Sequence[str], path: Path,
                title: str, seed: int = 0) -> None:
    """Figure 3: one scikit-learn t-SNE panel per (method, features, labels, silhouette), colour = class."""
    from sklearn.manifold import TSNE

    fig = Figure(figsize=(4 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, feats, labels, silhouette) in zip(axes[0], panels):
        xy = TSNE(perplexity=min(30.0, len(feats) - 1.0), init="pca", random_state=seed).fit_transform(feats)
        for k in np.unique(labels):
            ax.scatter(*xy[labels == k].T, s=10, label=class_names[k])
        ax.set(title=f"{label} (silhouette {silhouette:.2f})", xticks=[], yticks=[])
    axes[0][0].legend(fontsize=7, markerscale=1.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- the command
@dataclass
class Sweep:
    """Where and how an experiment's runs are made; see ``cign-experiment --help``."""

    dataset: str = "avdigits"
    name: str | None = None
    data_dir: str = "data"
    preset: str = "cpu"
    seeds: Sequence[int] = (0, 1, 2)
    runs: Path = Path("runs/experiments")
    operational: Mapping[str, Any] = field(default_factory=dict)  # device, amp, workers
    tasks: int | None = None  # task count of rows that set none (needed for a csv store)

    def settings(self, row: Row, seed: int) -> TrainSettings:
        return row_settings(row, self.preset, seed, self.dataset, self.name, self.data_dir, self.tasks, **self.operational)

    def path(self, row: Row, seed: int) -> Path:
        return run_dir(self.runs, self.settings(row, seed), self.preset, self.tasks)

    def applies(self, row: Row, log=None) -> bool:
        """Whether the row's settings fit the data set (its task count divides the classes)."""
        try:
            n_tasks(self.settings(row, self.seeds[0]))
        except ValueError as e:
            if log:
                log(f"row {row.key} does not apply: {e}")
            return False
        return True


def run_experiment(exp: Experiment, sweep: Sweep, keys: Iterable[str] | None = None, train_missing: bool = True,
                   log=print) -> None:
    """Train (or resume) the runs of the rows named in ``keys`` (all by default) for every seed."""
    keys = set(keys) if keys is not None else {r.key for r in exp.rows}
    first = sweep.settings(exp.rows[0], sweep.seeds[0])
    if first.dataset == "avdigits":  # run names read the store's classes; training reads the store
        ensure_avdigits(first.data_dir, first.spec)
    for seed in sweep.seeds:  # seed-major: a sweep cut short has every row at its first seeds
        for row in exp.rows:
            if row.key not in keys:
                continue
            if not sweep.applies(row, log if seed == sweep.seeds[0] else None):
                continue
            settings, path = sweep.settings(row, seed), sweep.path(row, seed)
            if finished(path, settings):
                continue
            if not train_missing:
                log(f"{exp.name}: {row.key} seed {seed} not finished ({path}); left out")
                continue
            seconds = train(settings, path)
            log(f"{exp.name}: {row.key} seed {seed} trained in {seconds:.0f} s ({path})")


def collect(exp: Experiment, sweep: Sweep) -> dict[str, dict]:
    """Every row's finished runs (any seed of ``sweep.seeds``) with their val and test metrics and the
    summaries; rows without a finished run are left out."""
    table = {}
    for row in exp.rows:
        if not sweep.applies(row):
            continue
        runs = []
        for seed in sweep.seeds:
            settings, path = sweep.settings(row, seed), sweep.path(row, seed)
            if not finished(path, settings):
                continue
            entry = {"seed": seed, "run": str(path), "metrics": run_metrics(settings, path)}
            if exp.diagnostics:
                entry["diagnostics"] = run_diagnostics(path, exp.diagnostics)
            runs.append(entry)
        if not runs:
            continue
        table[row.key] = {"label": row.label, "method": row.method, "model": dict(row.model),
                          "settings": dict(row.settings), "runs": runs,
                          "run_settings": sweep.settings(row, runs[0]["seed"]).to_dict() | {"seed": None},
                          "summary": {split: summarize(runs, split) for split in ("val", "test")}}
        if exp.diagnostics:
            table[row.key]["diagnostics"] = {k: mean_std([r["diagnostics"][k] for r in runs]) for k in exp.diagnostics
                                             if all(k in r["diagnostics"] for r in runs)}
    return table


def write_results(exp: Experiment, sweep: Sweep, table: Mapping[str, dict], out: Path, machine: Mapping[str, Any],
                  machine_label: str) -> list[Path]:
    """``out/experiment_NAME_STORE.{json,md,png}``: the tables on test (reported) and val (chosen on)
    in the paper's layout and in full, and the experiment's figure (test split)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"experiment_{exp.name}_{sweep.name or sweep.dataset}"
    spec = make_plan(sweep.settings(exp.rows[0], sweep.seeds[0])).store.spec  # the runs' inputs (finished() checks)
    header = (f"{exp.title}. Data set {sweep.name or sweep.dataset}, preset {sweep.preset} "
              f"({spec.sample_rate} Hz audio, {spec.spectrogram_shape[0]} x {spec.spectrogram_shape[1]} spectrogram, "
              f"{spec.frame_size} px frames); runs in {sweep.runs}; "
              f"mean ± std over the seeds' finished runs; {machine_label}.")
    md = [f"## {exp.title}\n\n{header}\n"]
    for split, role in (("test", "reported"), ("val", "settings are chosen on it")):
        md.append(f"\n### {split} split ({role})\n\n" + paper_table(table, split)
                  + f"\nAudio-visual, every summary ({split}):\n\n" + full_table(table, split))
    if exp.diagnostics:
        md.append("\n### diagnostics: median over each run's steps, mean ± std over seeds\n\n| row | "
                  + " | ".join(t.split("/")[1] for t in exp.diagnostics) + " |\n|---|" + "---:|" * len(exp.diagnostics) + "\n")
        for entry in table.values():
            md.append(f"| {entry['label']} | " + " | ".join(
                f"{entry['diagnostics'][t][0]:.3g} ± {entry['diagnostics'][t][1]:.2g}" if t in entry["diagnostics"] else "-"
                for t in exp.diagnostics) + " |\n")
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    doc: dict[str, Any] = {"experiment": exp.name, "title": exp.title, "dataset": sweep.dataset, "name": sweep.name,
                           "preset": sweep.preset, "preset_settings": preset_settings(sweep.preset).to_dict(),
                           "tasks": n_tasks(sweep.settings(exp.rows[0], sweep.seeds[0])), "spec": spec.to_dict(),
                           "seeds": list(sweep.seeds),
                           "chosen_on": "val", "reported_on": "test", "machine": dict(machine), "rows": table}
    png = stem.with_suffix(".png")
    if exp.figure == "buffer":
        plot_buffer(table, "test", png, f"{exp.title} ({sweep.name or sweep.dataset}, test)")
    elif exp.figure == "tsne":
        panels, names, doc["silhouette"] = [], None, {}
        for key, entry in table.items():
            row = next(r for r in exp.rows if r.key == key)
            scores = {}
            for i, run in enumerate(entry["runs"]):  # the panel shows the first finished seed; the score is every seed's
                feats, labels = first_task_features(sweep.settings(row, run["seed"]), sweep.path(row, run["seed"]))
                scores[run["seed"]] = class_silhouette(feats, labels)
                if i == 0:
                    panels.append((entry["label"], feats, labels, scores[run["seed"]]))
            names = names or ck.TaskCheckpoint.load(ck.task_path(sweep.path(row, entry["runs"][0]["seed"]), 0)).classes
            mean, std = mean_std(list(scores.values()))
            doc["silhouette"][entry["label"]] = {"per_seed": scores, "mean": mean, "std": std}
        tsne_panels(panels, names, png, f"{exp.title} (test clips, each method's first finished seed)")
        md.append("\nSilhouette score of the first task's test features by class (cosine, before t-SNE; higher "
                  "is better separated), mean ± std over the seeds: " + ", ".join(
                      f"{k} {cell((v['mean'], v['std']), len(v['per_seed']), 3)} ({len(v['per_seed'])})"
                      for k, v in doc["silhouette"].items()) + "\n")
    else:
        plot_seen(table, "test", png, f"{exp.title} ({sweep.name or sweep.dataset}, test)")
    md.append(f"\n![{exp.title}]({png.name})\n")
    written.append(png)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    stem.with_suffix(".md").write_text("".join(md))
    return written
