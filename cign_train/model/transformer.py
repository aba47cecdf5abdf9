"""Self-attention over features and class tokens, phi_a and phi_v of eqs 1-4."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig


class ModalityTransformer(nn.Module):
    """phi(X) with X = [features; class tokens] (eqs 1-2), returning the updated halves of X.

    Eqs 3-4 write phi as one single-head attention with identity projections,
    Softmax(x_j X^T / sqrt(D)) X. We use cfg.depth standard pre-norm transformer encoder layers
    (multi-head attention with learned projections, a GELU MLP, LayerNorm and residuals) and a
    final LayerNorm; eq 3 is the special case of one head, identity projections and no MLP.
    No positional embedding: the paper adds none and the grouping (eq 7) pools over locations.
    """

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=cfg.dim,
                nhead=cfg.heads,
                dim_feedforward=int(cfg.mlp_ratio * cfg.dim),
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor,
                prompts: Mapping[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, P, D), tokens (B, K, D) -> (f_hat (B, P, D), c_hat (B, K, D)).

        ``prompts`` {i: (B, L_i, D)} prepends L_i prompt vectors to the sequence entering layer i
        (prompt tuning, as L2P and DualPrompt attach prompts; ``cign_train.methods.l2p``): from there
        on they pass through the layers with the rest, and their outputs are dropped. None (every
        other caller, the export included) computes exactly the unprompted phi.
        """
        n_feats, n_prompts = feats.shape[1], 0
        x = torch.cat([feats, tokens], dim=1)  # (B, P+K, D)
        for i, layer in enumerate(self.layers):
            if prompts is not None and i in prompts:
                x = torch.cat([prompts[i], x], dim=1)  # (B, L_i + ..., D)
                n_prompts += prompts[i].shape[1]
            x = layer(x)
        x = self.norm(x)
        if n_prompts:
            x = x[:, n_prompts:]  # drop the prompt positions: (B, P+K, D)
        return x[:, :n_feats], x[:, n_feats:]  # (B, P, D), (B, K, D)
