"""Confidence of a prediction from p_av, and the "no known source" rule (numpy only).

p_av,i = p_a,i * p_v,i (Sec. 3.3) are independent per-class scores, not a distribution. The
runtime ranks classes by p_av and scores the top class by q = softmax(ln p_av / T) over the
classes, with the temperature T fitted on the validation split (``calibration.confidence``); below
the manifest's threshold the answer is "no known source".
"""
from __future__ import annotations

import numpy as np

EPS = 1e-12  # ln of a zero probability


def calibrated(p_av: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(..., K) p_av -> (..., K) q = softmax(ln(p_av) / T) over the last axis."""
    z = np.log(np.maximum(np.asarray(p_av, dtype=np.float64), EPS)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_confidence(p_av: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(..., K) p_av -> (top-1 class (...), its calibrated confidence (...))."""
    q = calibrated(p_av, temperature)
    top = q.argmax(axis=-1)
    return top, np.take_along_axis(q, top[..., None], axis=-1)[..., 0]


def known(p_av: np.ndarray, temperature: float, threshold: float) -> np.ndarray:
    """(..., K) -> bool (...): True where the top class is confident enough to be answered."""
    return top_confidence(p_av, temperature)[1] >= threshold
