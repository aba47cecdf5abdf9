"""A run's result files: ``metrics.json``, ``metrics.csv``, ``accuracy_matrix.png`` and the table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from cign_train.metrics import collapses, plot_accuracy_matrix, summarize


def metrics_document(rows: dict[str, list[list[float]]], seen: dict[str, list[float]], eval_clips: list[int],
                     split: str, classes_seen: list[int], guarded: dict[str, list[int]]) -> dict:
    """metrics.json's content for the tasks evaluated so far.

    ``accuracy_matrix[m][t][i]`` (%) is modality m's accuracy on task i after task t;
    ``average_accuracy`` (AV-CIL) is the mean over steps of the seen-class accuracy,
    ``average_accuracy_l2p`` (L2P / DualPrompt, the pair CIGN's tables use) the mean per-task
    accuracy after the last task; ``diagonal`` is each task's accuracy right after it was learned
    (``a[t][t]``); ``forgetting`` holds ``avcil``, ``facil`` and ``l2p``, each named by its source
    (definitions in ``cign_train.metrics``). ``classes_seen[t]`` is the number of classes seen after task t;
    ``warnings`` lists every modality whose seen-class accuracy collapsed to chance
    (``cign_train.metrics.collapses``); ``guarded_steps`` holds, per action of ``cign_train.guard``, the
    number of steps of each task whose gradient was non-finite (redone in fp32, or skipped).
    """
    summary = summarize(rows, seen)
    return {
        "accuracy_matrix": rows,
        "seen_accuracy": seen,
        "eval_split": split,
        "eval_clips": eval_clips,
        "average_accuracy": {m: v["average_accuracy"] for m, v in summary.items()},
        "average_accuracy_l2p": {m: v["average_accuracy_l2p"] for m, v in summary.items()},
        "final_accuracy": {m: v["final_accuracy"] for m, v in summary.items()},
        "diagonal": {m: v["diagonal"] for m, v in summary.items()},
        "forgetting": {m: v["forgetting"] for m, v in summary.items()},
        "guarded_steps": guarded,
        "warnings": collapses(seen, classes_seen),
    }


def write_metrics(run_dir: Path, rows: dict[str, list[list[float]]], seen: dict[str, list[float]],
                  eval_clips: list[int], split: str, classes_seen: list[int], guarded: dict[str, list[int]]) -> dict:
    """Write the result files (:func:`metrics_document`, csv, matrix plot); returns metrics.json's content."""
    out = metrics_document(rows, seen, eval_clips, split, classes_seen, guarded)
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, allow_nan=False))
    os.replace(tmp, run_dir / "metrics.json")
    tmp = run_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["modality", "after_task", "task", "accuracy"])
        for m, matrix in rows.items():
            for t, row in enumerate(matrix):
                for i, acc in enumerate(row):
                    w.writerow([m, t, i, f"{acc:.4f}"])
    os.replace(tmp, run_dir / "metrics.csv")
    plot_accuracy_matrix(rows, run_dir / "accuracy_matrix.png")
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def results_table(metrics: dict, label: str = "") -> str:
    """Plain-text table: per modality, both average accuracies, the final accuracy, the three
    forgetting measures (named by source, ``cign_train.metrics``) and the diagonal (each task right
    after learning it) (%)."""
    head = (f"{'':<14}{'avg(AV-CIL)':>12}{'avg(L2P)':>10}{'final':>8}{'forget(AV-CIL)':>16}{'forget(FACIL)':>15}"
            f"{'forget(L2P)':>13}  just learned (per task)")
    lines = [label, head] if label else [head]
    for m in metrics["average_accuracy"]:
        f = metrics["forgetting"][m]
        diag = " ".join(f"{x:.1f}" for x in metrics["diagonal"][m])
        lines.append(f"{m:<14}{_fmt(metrics['average_accuracy'][m]):>12}{_fmt(metrics['average_accuracy_l2p'][m]):>10}"
                     f"{_fmt(metrics['final_accuracy'][m]):>8}{_fmt(f['avcil']):>16}{_fmt(f['facil']):>15}"
                     f"{_fmt(f['l2p']):>13}  {diag}")
    return "\n".join(lines)
