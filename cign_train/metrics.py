"""Class-incremental metrics over the accuracy matrix (numpy only, no torch).

The accuracy matrix ``a`` is T x T: ``a[t][i]`` is the test accuracy on task ``i``'s classes after
training task ``t`` (``i <= t``); entries above the diagonal are NaN (or rows may stop at the
diagonal). ``seen[t]`` is the accuracy on the union of all tasks seen after task ``t``; with unequal
test sizes it is not the mean of ``a[t][:t+1]``, so it is passed separately (see ``seen_accuracy``).
Units are the caller's: every function is linear in the accuracies, so fractions give fractions and
percentages give percentages.

Two forgetting measures are in use:

* ``forgetting_avcil`` (AV-CIL, Pian et al. ICCV 2023, which CIGN reports against): at every step
  t >= 1, the mean over old tasks i < t of the drop from task i's best earlier accuracy
  (max over steps i..t-1) to its accuracy at step t; then the mean of that over steps 1..T-1.
* ``forgetting_final`` (L2P, DualPrompt, FACIL): the same drop measured only at the last step,
  i.e. the mean over tasks i < T-1 of best accuracy over steps i..T-2 minus the final accuracy.

Drops are not clipped at zero, so backward transfer shows up as negative forgetting. With a single
task there is nothing to forget and both measures are NaN (``summarize`` writes it as ``None``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

def accuracy_matrix(a) -> np.ndarray:
    """``a`` as a float T x T array, NaN above the diagonal; rows may be full or end at the diagonal."""
    rows = list(a)
    size = len(rows)
    out = np.full((size, size), np.nan)
    for t, row in enumerate(rows):
        row = np.asarray(row, dtype=float)
        if row.ndim != 1 or len(row) not in (t + 1, size):
            raise ValueError(f"row {t} of the accuracy matrix has shape {row.shape}; "
                             f"expected {t + 1} or {size} entries")
        if not np.all(np.isfinite(row[:t + 1])):
            raise ValueError(f"row {t} of the accuracy matrix has a missing entry on or below the diagonal")
        out[t, :t + 1] = row[:t + 1]
    return out


def seen_accuracy(correct, total) -> float:
    """Accuracy (a fraction) on the union of the seen tasks' test sets from per-task counts."""
    correct = np.asarray(correct, dtype=float)
    total = np.asarray(total, dtype=float)
    if correct.shape != total.shape or total.sum() <= 0:
        raise ValueError(f"need matching per-task counts with a positive total, got {correct} / {total}")
    return float(correct.sum() / total.sum())


def average_accuracy(seen) -> float:
    """Mean over steps of the accuracy on all seen classes ("Average accuracy" of L2P, DualPrompt, AV-CIL)."""
    seen = np.asarray(seen, dtype=float)
    if seen.size == 0:
        raise ValueError("no steps to average")
    return float(seen.mean())


def final_accuracy(seen) -> float:
    """Accuracy on all classes after the last task."""
    if len(seen) == 0:
        raise ValueError("no steps recorded")
    return float(seen[-1])


def diagonal(a) -> list[float]:
    """Accuracy on each task right after learning it, ``a[t][t]`` (plasticity: a task never learned
    cannot be forgotten, so low forgetting means little beside a low diagonal)."""
    return [float(x) for x in np.diag(accuracy_matrix(a))]


def _drops(a: np.ndarray, t: int) -> np.ndarray:
    """For each old task i < t: best accuracy over steps i..t-1 minus the accuracy at step t."""
    best = np.nanmax(a[:t, :t], axis=0)  # NaN above the diagonal leaves only steps k >= i
    return best - a[t, :t]


def forgetting_avcil(a) -> float:
    """AV-CIL forgetting: mean over steps t = 1..T-1 of the mean drop of old tasks at step t; NaN if T == 1."""
    a = accuracy_matrix(a)
    if len(a) < 2:
        return math.nan
    return float(np.mean([_drops(a, t).mean() for t in range(1, len(a))]))


def forgetting_final(a) -> float:
    """L2P/DualPrompt/FACIL forgetting: mean drop of the old tasks at the last step; NaN if T == 1."""
    a = accuracy_matrix(a)
    if len(a) < 2:
        return math.nan
    return float(_drops(a, len(a) - 1).mean())


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(per_modality: dict, seen: dict) -> dict:
    """Per modality: average and final accuracy, the diagonal and both forgetting measures; JSON-ready (NaN -> None)."""
    if set(per_modality) != set(seen):
        raise ValueError(f"modalities differ: matrices for {sorted(per_modality)}, seen accuracy for {sorted(seen)}")
    out = {}
    for name, a in per_modality.items():
        a = accuracy_matrix(a)
        if len(seen[name]) != len(a):
            raise ValueError(f"{name}: {len(seen[name])} seen accuracies for {len(a)} tasks")
        out[name] = {
            "average_accuracy": average_accuracy(seen[name]),
            "final_accuracy": final_accuracy(seen[name]),
            "diagonal": diagonal(a),
            "forgetting": {"avcil": _json_number(forgetting_avcil(a)),
                           "final": _json_number(forgetting_final(a))},
        }
    return out


def plot_accuracy_matrix(a_by_modality: dict, path) -> Path:
    """Write a heat map PNG with one annotated panel per modality (rows: after task t, columns: task i)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    mats = {name: accuracy_matrix(a) for name, a in a_by_modality.items()}
    if not mats:
        raise ValueError("no accuracy matrices to plot")
    vmax = max(float(np.nanmax(m)) for m in mats.values()) or 1.0
    size = max(len(m) for m in mats.values())
    side = 1.0 + 0.6 * size
    fig = Figure(figsize=(side * len(mats), side + 0.5), layout="constrained")
    for ax, (name, m) in zip(fig.subplots(1, len(mats), squeeze=False)[0], mats.items()):
        image = ax.imshow(np.ma.masked_invalid(m), vmin=0.0, vmax=vmax, cmap="viridis")
        for t, i in zip(*np.tril_indices(len(m))):
            light = m[t, i] < 0.6 * vmax  # light text on the dark end of viridis
            ax.text(i, t, f"{m[t, i]:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
        ax.set(title=name, xlabel="task i", ylabel="after task t",
               xticks=range(len(m)), yticks=range(len(m)))
    fig.colorbar(image, ax=fig.axes, shrink=0.8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
