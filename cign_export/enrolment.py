"""What a tokens-as-input export carries for learning classes on the device (``cign-enroll``).

- ``encoders_fp32.onnx``: ``(frame, spectrogram) -> (f_a (N, 1, D), f_v (N, P, D))``, the encoders with
  the graph's normalisation, so a shot is encoded once;
- ``head.npz``: the weights after the encoders (phi_a, phi_v, grouping, heads) and their config, for
  ``cign_runtime.head``'s numpy forward and token gradient;
- ``exemplars.npz``: encoder features (float16) of a few val clips per class
  (``cign_export.exporter.exemplar_indices``), the negatives a new token is fitted against, since the
  device has no training clips (rehearsal without raw data).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cign_runtime import enroll
from cign_runtime.head import CONFIG_KEY, HeadConfig
from cign_train.model import CIGN
from cign_train.model.grouping import EPS

#: Prefixes of the state-dict entries ``head.npz`` holds.
HEAD_MODULES = ("phi_a.", "phi_v.", "group_a.", "group_v.", "head_a.", "head_v.")


class Encoders(nn.Module):
    """The export graph's normalisation, then both encoders: raw inputs -> (f_a (N, 1, D), f_v (N, P, D))."""

    tokens_as_input = False

    def __init__(self, model: CIGN, normalize: nn.Module, spec):
        super().__init__()
        self.model, self.normalize, self.spec = model.eval(), normalize, spec

    def forward(self, frame: torch.Tensor, spectrogram: torch.Tensor):
        frames, spectrograms = self.normalize(frame, spectrogram)
        return self.model.audio_encoder(spectrograms).unsqueeze(1), self.model.visual_encoder(frames)


def save_head(model: CIGN, path: Path) -> None:
    """``head.npz``: the post-encoder weights (float32) and a :class:`HeadConfig`."""
    if model.cfg.assign != "soft":
        raise ValueError(f"on-device enrolment fits tokens through the soft assignment of eq 6; this model "
                         f"uses assign={model.cfg.assign!r}")
    layer = model.phi_a.layers[0]
    cfg = HeadConfig(model.cfg.dim, model.cfg.depth, model.cfg.heads, float(layer.norm1.eps), EPS)
    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items() if k.startswith(HEAD_MODULES)}
    np.savez(path, **weights, **{CONFIG_KEY: np.array(json.dumps(cfg.__dict__))})


@torch.no_grad()
def encode(encoders: Encoders, feeds: dict[str, np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Eager encoder features of graph feeds (float32)."""
    parts_a, parts_v = [], []
    for s in range(0, len(feeds["frame"]), batch):
        f_a, f_v = encoders(torch.from_numpy(feeds["frame"][s : s + batch]),
                            torch.from_numpy(feeds["spectrogram"][s : s + batch]))
        parts_a.append(f_a.numpy())
        parts_v.append(f_v.numpy())
    return np.concatenate(parts_a), np.concatenate(parts_v)


def save_exemplars(path: Path, f_a: np.ndarray, f_v: np.ndarray, labels: np.ndarray) -> None:
    enroll.Exemplars(f_a.astype(np.float16), f_v.astype(np.float16), labels.astype(np.int64)).save(path)
