"""Joint training: the upper bound. At every task the model trains on the full training data of
every class seen so far (FACIL's "joint": it continues from the previous task's model), so nothing
needs remembering; its accuracy is what class-incremental methods try to approach."""
from __future__ import annotations

import torch

from cign_train.losses import grouping_bce, token_independence
from cign_train.methods.base import Inputs, Method


class Joint(Method):
    """L = sum_i BCE(y_i, p_a,i) + BCE(y_i, p_v,i) + sum_seen CE(h_i, e_i), on all seen classes' data."""

    NAME = "joint"
    NEEDS_BUFFER = False
    TRAINS_ON_SEEN = True

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        bce = grouping_bce(out.logits_a, out.logits_v, batch.labels)
        ce = token_independence(self.model.token_logits(), self.task.old_classes + self.task.new_classes)
        return {"bce": bce, "ce": ce, "total": bce + ce}
