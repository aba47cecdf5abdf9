"""Class-incremental metrics over the accuracy matrix (numpy only, no torch).

The accuracy matrix ``a`` is T x T: ``a[t][i]`` is the test accuracy on task ``i``'s classes after
training task ``t`` (``i <= t``); entries above the diagonal are NaN (or rows may stop at the
diagonal). ``seen[t]`` is the accuracy on the union of all tasks seen after task ``t``; with unequal
test sizes it is not the mean of ``a[t][:t+1]``, so it is passed separately (see ``seen_accuracy``).
Units are the caller's: every function is linear in the accuracies, so fractions give fractions and
percentages give percentages.

Two pairs of (average accuracy, forgetting) are in use; each key is named by its source:

* AV-CIL (Pian et al., ICCV 2023): ``average_accuracy`` is the mean over steps of the accuracy on
  all classes seen so far; ``forgetting_avcil`` is, at every step t >= 1, the mean over old tasks
  i < t of the drop from task i's best earlier accuracy (max over steps i..t-1) to its accuracy at
  step t, then the mean of that over steps 1..T-1. Drops are not clipped: backward transfer shows
  up as negative forgetting.
* L2P / DualPrompt (Wang et al., CVPR 2022 / ECCV 2022), the pair CIGN's tables cite ("the common
  metrics in previous methods [66, 65]", Sec. 4.1): ``average_accuracy_l2p`` is the mean of the
  per-task accuracies after the last task; ``forgetting_l2p`` is the mean over old tasks of the
  best accuracy over *all* steps, the last one included, minus the final accuracy (never negative).

``forgetting_facil`` (FACIL, Masana et al. TPAMI 2022; Chaudhry et al. ECCV 2018) is AV-CIL's drop
measured at the last step only: best over steps i..T-2, the last excluded, minus the final
accuracy (so it can be negative). With a single task there is nothing to forget and every
forgetting measure is NaN (``summarize`` writes it as ``None``).
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
    """AV-CIL's average accuracy: the mean over steps of the accuracy on all seen classes."""
    seen = np.asarray(seen, dtype=float)
    if seen.size == 0:
        raise ValueError("no steps to average")
    return float(seen.mean())


def average_accuracy_l2p(a) -> float:
    """L2P / DualPrompt's average accuracy: the mean of the per-task accuracies after the last task."""
    return float(accuracy_matrix(a)[-1].mean())


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


def forgetting_facil(a) -> float:
    """FACIL / Chaudhry forgetting: mean drop of the old tasks at the last step from their best
    earlier accuracy (the last step excluded); NaN if T == 1."""
    a = accuracy_matrix(a)
    if len(a) < 2:
        return math.nan
    return float(_drops(a, len(a) - 1).mean())


def forgetting_l2p(a) -> float:
    """L2P / DualPrompt forgetting: mean over old tasks of the best accuracy over all steps (the last
    included) minus the final accuracy, so never negative; NaN if T == 1."""
    a = accuracy_matrix(a)
    if len(a) < 2:
        return math.nan
    old = len(a) - 1
    return float((np.nanmax(a[:, :old], axis=0) - a[-1, :old]).mean())


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(per_modality: dict, seen: dict) -> dict:
    """Per modality: both average accuracies, the final accuracy, the diagonal and the three forgetting
    measures; JSON-ready (NaN -> None)."""
    if set(per_modality) != set(seen):
        raise ValueError(f"modalities differ: matrices for {sorted(per_modality)}, seen accuracy for {sorted(seen)}")
    out = {}
    for name, a in per_modality.items():
        a = accuracy_matrix(a)
        if len(seen[name]) != len(a):
            raise ValueError(f"{name}: {len(seen[name])} seen accuracies for {len(a)} tasks")
        out[name] = {
            "average_accuracy": average_accuracy(seen[name]),
            "average_accuracy_l2p": average_accuracy_l2p(a),
            "final_accuracy": final_accuracy(seen[name]),
            "diagonal": diagonal(a),
            "forgetting": {"avcil": _json_number(forgetting_avcil(a)),
                           "facil": _json_number(forgetting_facil(a)),
                           "l2p": _json_number(forgetting_l2p(a))},
        }
    return out


def collapses(seen: dict[str, list[float]], classes_seen: list[int], at_chance: float = 1.5,
              learned: float = 2.0) -> list[str]:
    """A sentence for every modality whose seen-class accuracy (%) fell to chance after a task: at most
    ``at_chance`` x 100 / K_t after task t >= 1, where after task t - 1 it was at least ``learned`` x
    100 / K_{t-1} (so it had learned something to lose). ``classes_seen[t]`` is K_t. A model whose
    weights broke (a NaN spreads to every output) lands here; so does one whose lr blew it up."""
    out = []
    for t in range(1, len(classes_seen)):
        for m, acc in seen.items():
            if t >= len(acc):
                continue
            chance, before = 100 / classes_seen[t], 100 / classes_seen[t - 1]
            if acc[t] <= at_chance * chance and acc[t - 1] >= learned * before:
                out.append(f"{m} seen-class accuracy collapsed to chance after task {t + 1}: {acc[t]:.1f} % "
                           f"(chance {chance:.1f} % of {classes_seen[t]} classes), from {acc[t - 1]:.1f} % after task {t}")
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
