"""CIGN: encoders, shared audio-visual class tokens, phi_a/phi_v, grouping and heads (Sec. 3, Fig. 2).

forward maps (spectrograms, frames) to per-class logits and class-aware features; the losses of
eqs 8-10 live in ``cign_train.losses`` so the exported graph never needs labels.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig
from cign_train.model.encoders import AudioEncoder, VisualEncoder
from cign_train.model.grouping import Grouping
from cign_train.model.transformer import ModalityTransformer

TOKEN_INIT_STD = 0.02


class CIGNOutput(NamedTuple):
    logits_a: torch.Tensor  # (B, K) FC(g_a,i) before the sigmoid
    logits_v: torch.Tensor  # (B, K) FC(g_v,i) before the sigmoid
    g_a: torch.Tensor  # (B, K, D) class-aware audio features (eq 7)
    g_v: torch.Tensor  # (B, K, D) class-aware visual features (eq 7)
    c_a: torch.Tensor  # (B, K, D) class tokens contextualised by the audio, c_hat_a,i (eq 1)
    c_v: torch.Tensor  # (B, K, D) class tokens contextualised by the visual features, c_hat_v,i (eq 2)


class Prediction(NamedTuple):
    p_a: torch.Tensor  # (B, K) audio class probabilities
    p_v: torch.Tensor  # (B, K) visual class probabilities
    p_av: torch.Tensor  # (B, K) audio-visual probabilities p_a * p_v


def predict(out: CIGNOutput) -> Prediction:
    """p_a,i = sigmoid(FC(g_a,i)), p_v,i likewise, and p_av,i = p_a,i * p_v,i (Sec. 3.3, inference)."""
    p_a, p_v = out.logits_a.sigmoid(), out.logits_v.sigmoid()
    return Prediction(p_a, p_v, p_a * p_v)


class CIGN(nn.Module):
    """Class-incremental grouping network over the K classes seen so far; grow() adds classes.

    One table of audio-visual class tokens c_i (K, D) feeds both phi_a and phi_v (eqs 1-2). The
    heads FC(g_i) -> 1 logit are shared across classes, so the class count lives only in `tokens`
    and in `token_cls`, the FC of e_i = softmax(FC(c_i)) (Sec. 3.2).
    """

    def __init__(self, cfg: CIGNConfig, n_classes: int):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.cfg = cfg
        self.audio_encoder = AudioEncoder(cfg)
        self.visual_encoder = VisualEncoder(cfg)
        self.tokens = nn.Parameter(torch.randn(n_classes, cfg.dim) * TOKEN_INIT_STD)  # (K, D)
        self.phi_a = ModalityTransformer(cfg)
        self.phi_v = ModalityTransformer(cfg)
        self.group_a = Grouping(cfg)
        self.group_v = Grouping(cfg)
        self.head_a = nn.Linear(cfg.dim, 1)
        self.head_v = nn.Linear(cfg.dim, 1)
        self.token_cls = nn.Linear(cfg.dim, n_classes)

    @property
    def n_classes(self) -> int:
        return self.tokens.shape[0]

    @torch.no_grad()
    def grow(self, n_new: int) -> None:
        """Append n_new fresh class tokens and token_cls rows; old ones are carried over unchanged.

        Replaces the two parameters, so build the optimizer after growing.
        """
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        old_tokens, old_cls = self.tokens, self.token_cls
        new_tokens = torch.randn(n_new, self.cfg.dim, device=old_tokens.device, dtype=old_tokens.dtype)
        self.tokens = nn.Parameter(
            torch.cat([old_tokens, new_tokens * TOKEN_INIT_STD]),  # (K + n_new, D)
            requires_grad=old_tokens.requires_grad,
        )
        cls = nn.Linear(self.cfg.dim, old_cls.out_features + n_new,
                        device=old_cls.weight.device, dtype=old_cls.weight.dtype)
        cls.weight[: old_cls.out_features] = old_cls.weight
        cls.bias[: old_cls.out_features] = old_cls.bias
        cls.requires_grad_(old_cls.weight.requires_grad)
        self.token_cls = cls

    def token_logits(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """FC(c_i) for every token, (..., K, K); softmax over the last dim gives e_i (Sec. 3.2). ``tokens``
        (..., K, D) replaces the table, e.g. by the contextualised tokens of CIGNOutput."""
        return self.token_cls(self.tokens if tokens is None else tokens)

    def encoder_features(self, spectrograms: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoders' features before the class tokens: f_a (B, D) and f_v averaged over its P
        patches (B, D). What herding, iCaRL's class means and the t-SNE figure read."""
        return self.audio_encoder(spectrograms), self.visual_encoder(frames).mean(dim=1)

    def forward(self, spectrograms: torch.Tensor, frames: torch.Tensor, tokens: torch.Tensor | None = None,
                prompts_a: Mapping[int, torch.Tensor] | None = None,
                prompts_v: Mapping[int, torch.Tensor] | None = None) -> CIGNOutput:
        """spectrograms (B, F, T) and frames (B, 3, H, W), both normalised -> CIGNOutput.

        ``tokens`` (K', D) replaces the model's table (exports with the table as a graph input).
        ``prompts_a`` / ``prompts_v`` {layer: (B, L, D)} are prompts for phi_a / phi_v
        (``ModalityTransformer.forward``; the L2P and DualPrompt baselines); None leaves phi unprompted.
        """
        f_a = self.audio_encoder(spectrograms).unsqueeze(1)  # (B, 1, D)
        f_v = self.visual_encoder(frames)  # (B, P, D)
        tokens = (self.tokens if tokens is None else tokens).expand(f_a.shape[0], -1, -1)  # (B, K, D)
        f_a_hat, c_a_hat = self.phi_a(f_a, tokens, prompts_a)  # eq 1: (B, 1, D), (B, K, D)
        f_v_hat, c_v_hat = self.phi_v(f_v, tokens, prompts_v)  # eq 2: (B, P, D), (B, K, D)
        g_a, _ = self.group_a(f_a_hat, c_a_hat)  # eqs 5-7: (B, K, D)
        g_v, _ = self.group_v(f_v_hat, c_v_hat)  # (B, K, D)
        logits_a = self.head_a(g_a).squeeze(-1)  # (B, K, 1) -> (B, K)
        logits_v = self.head_v(g_v).squeeze(-1)  # (B, K, 1) -> (B, K)
        return CIGNOutput(logits_a, logits_v, g_a, g_v, c_a_hat, c_v_hat)
