"""Fit the runtime's confidence calibration on the validation split, and report it on test.

The runtime scores the top class by q = softmax(ln p_av / T) (``cign_runtime.confidence``) and
answers "no known source" below a threshold; both numbers are fitted here with those same
functions, on validation p_av only:

- T minimises the mean negative log-likelihood of the true class under q (temperature scaling,
  Guo et al. 2017), searched as ln T in [ln 0.01, ln 100] by scipy's bounded scalar minimiser.
- The threshold keeps 95 % of the correctly classified validation predictions (the TPR-95
  operating point of open-set recognition): it is the 5th percentile of their calibrated top-1
  confidence, taken as the floor(0.05 n)-th smallest of the n values so that at least 95 % of them
  (ties included) satisfy confidence >= threshold.
- ECE uses 15 equal-width confidence bins (lo, hi] and sum_b |B_b| / n * |acc(B_b) - conf(B_b)|.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from cign_runtime.confidence import calibrated, known, top_confidence
from cign_runtime.manifest import Confidence

KEEP = 0.95  # share of correct validation predictions the threshold keeps
BINS = 15
LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
RULE = ("threshold = 5th percentile of the calibrated top-1 confidence of the correctly classified "
        "validation predictions (floor(0.05 n)-th smallest): keeps >= 95 % of them (TPR-95)")


def nll(p_av: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -ln q_y of the true classes under ``calibrated(p_av, temperature)``."""
    q = calibrated(p_av, temperature)
    return float(-np.mean(np.log(np.maximum(q[np.arange(len(labels)), labels], np.finfo(np.float64).tiny))))


def ece(p_av: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = BINS) -> float:
    """Expected calibration error of the top-1 calibrated confidence, ``bins`` equal-width bins."""
    top, conf = top_confidence(p_av, temperature)
    correct = top == labels
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # bin b holds (b/bins, (b+1)/bins]
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.sum() / len(labels) * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def fit_confidence(p_av: np.ndarray, labels: np.ndarray) -> Confidence:
    """Temperature and threshold fitted on validation ``p_av`` (N, K) with true classes ``labels`` (N,).

    ``labels`` index p_av's columns (model class order). Raises ValueError when no validation
    prediction is correct, since the threshold rule is then undefined.
    """
    p_av, labels = _checked(p_av, labels)
    fit = minimize_scalar(lambda log_t: nll(p_av, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS, method="bounded")
    temperature = float(np.exp(fit.x))
    top, conf = top_confidence(p_av, temperature)
    correct = np.sort(conf[top == labels])
    if not len(correct):
        raise ValueError("no validation prediction is correct: the confidence threshold is undefined")
    threshold = float(correct[int(np.floor((1 - KEEP) * len(correct)))])
    report = evaluate(p_av, labels, Confidence(temperature, threshold))
    metrics = {
        "n": len(labels),
        "val_accuracy": report["accuracy"],
        "nll_before": nll(p_av, labels, 1.0),
        "nll_after": nll(p_av, labels, temperature),
        "ece_before": ece(p_av, labels, 1.0),
        "ece_after": report["ece"],
        "coverage": report["coverage"],
        "answered_accuracy": report["answered_accuracy"],
        "correct_kept": float(np.mean(correct >= threshold)),
    }
    return Confidence(temperature, threshold, "val", RULE, metrics)


def evaluate(p_av: np.ndarray, labels: np.ndarray, confidence: Confidence) -> dict[str, float]:
    """ECE, accuracy, coverage (share answered) and accuracy of the answered predictions.

    ``answered_accuracy`` is NaN when nothing is answered.
    """
    p_av, labels = _checked(p_av, labels)
    top, _ = top_confidence(p_av, confidence.temperature)
    answered = known(p_av, confidence.temperature, confidence.threshold)
    correct = top == labels
    return {
        "n": len(labels),
        "ece": ece(p_av, labels, confidence.temperature),
        "accuracy": float(correct.mean()),
        "coverage": float(answered.mean()),
        "answered_accuracy": float(correct[answered].mean()) if answered.any() else float("nan"),
    }


def _checked(p_av, labels) -> tuple[np.ndarray, np.ndarray]:
    p_av, labels = np.asarray(p_av, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if p_av.ndim != 2 or labels.shape != (p_av.shape[0],) or not len(labels):
        raise ValueError(f"expected p_av (N, K) and labels (N,) with N > 0, got {p_av.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= p_av.shape[1]:
        raise ValueError(f"labels outside 0..{p_av.shape[1] - 1}")
    return p_av, labels
