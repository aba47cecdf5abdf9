"""Grouping block g_a / g_v of eqs 5-7: features are assigned to class tokens and pooled per class."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cign_train.config import CIGNConfig

EPS = 1e-6  # guards eq 7's division under soft assignment


class Grouping(nn.Module):
    """(f_hat, c_hat) -> class-aware features g_i (eq 7) and the assignment A (eq 6).

    A[p, i] = softmax_i((W_q f_p) . (W_k c_i) / sqrt(D)): each location p is distributed over the K
    class tokens. The 1/sqrt(D) scaling is our addition (eq 6 has none), keeping the softmax out of
    saturation at initialisation. cfg.assign == "hard" replaces A by a one-hot assignment: Gumbel
    straight-through in training (Table 5), the argmax in eval.

    g_i = c_i + W_o(sum_p A[p, i] W_v f_p / (sum_p A[p, i] + eps)). For audio (P = 1) with soft
    assignment the normalised sum reduces to W_v f_a, as eq 7 writes it (eps only guards the
    division). Under hard assignment the denominator is the member count clamped to 1, so a class
    that no location chose contributes nothing (0 / 1).
    """

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        # W_q, W_k, W_v, W_o are D x D matrices in eqs 6-7: no bias, so an empty class adds exactly 0
        self.w_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.w_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.w_v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.w_o = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.hard = cfg.assign == "hard"
        self.gumbel_tau = cfg.gumbel_tau

    def assign(self, logits: torch.Tensor) -> torch.Tensor:
        """Assignment logits (B, P, K) -> A (B, P, K), normalised over the K class tokens (eq 6)."""
        if not self.hard:
            return logits.softmax(dim=-1)
        if self.training:
            return F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=True, dim=-1)
        return torch.zeros_like(logits).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)

    def forward(self, f_hat: torch.Tensor, c_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_hat (B, P, D), c_hat (B, K, D) -> (g (B, K, D), A (B, P, K))."""
        q, k = self.w_q(f_hat), self.w_k(c_hat)  # (B, P, D), (B, K, D)
        logits = torch.einsum("bpd,bkd->bpk", q, k) / math.sqrt(q.shape[-1])  # (B, P, K)
        a = self.assign(logits)  # (B, P, K)
        pooled = torch.einsum("bpk,bpd->bkd", a, self.w_v(f_hat))  # (B, K, D)
        mass = a.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
        if self.hard:
            # Member counts, piecewise constant: no gradient through them. An eps-guarded denominator
            # would send W_v f_p / eps back through the straight-through estimator for an empty class.
            mass = mass.detach().clamp_min(1.0)
        else:
            mass = mass + EPS
        return c_hat + self.w_o(pooled / mass), a  # (B, K, D), (B, P, K)
