"""Fine-tuning: the lower bound. The same network and classification objective, task after task,
with no rehearsal buffer, no token distillation and no continual-grouping loss."""
from __future__ import annotations

import torch

from cign_train.losses import grouping_bce, token_independence
from cign_train.methods.base import Inputs, Method


class Finetune(Method):
    """L = sum_i BCE(y_i, p_a,i) + BCE(y_i, p_v,i) + sum_new CE(h_i, e_i) (eq 8 without its KL term)."""

    NAME = "finetune"
    NEEDS_BUFFER = False

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        bce = grouping_bce(out.logits_a, out.logits_v, batch.labels)
        ce = token_independence(self.model.token_logits(), self.task.new_classes)
        return {"bce": bce, "ce": ce, "total": bce + ce}
