"""Fine-tuning: the lower bound. The same network and classification objective, task after task,
with no rehearsal buffer, no token distillation and no continual-grouping loss."""
from __future__ import annotations

import torch

from cign_train.losses import grouping_bce, token_independence
from cign_train.methods.base import Inputs, Method
from cign_train.model import CIGNOutput


class Finetune(Method):
    """L = sum_i BCE(y_i, p_a,i) + BCE(y_i, p_v,i) + sum_new CE(h_i, e_i) (eq 8 without its KL term)."""

    NAME = "finetune"
    NEEDS_BUFFER = False

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        return self.terms(self.forward(batch.spectrograms, batch.frames), batch)

    def terms(self, out: CIGNOutput, batch: Inputs) -> dict[str, torch.Tensor]:
        """``bce``, ``ce`` and their sum ``total`` on the model's outputs for the batch (for subclasses
        that add a term to them)."""
        bce = grouping_bce(out.logits_a, out.logits_v, batch.labels)
        ce = token_independence(self.model.token_logits(), self.task.new_classes)
        return {"bce": bce, "ce": ce, "total": bce + ce}
