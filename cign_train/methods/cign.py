"""CIGN (paper Sec. 3): class-token distillation + continual grouping against a frozen copy of the
previous task's model, trained on the task's data plus the rehearsal buffer (eqs 8-10)."""
from __future__ import annotations

import copy

import torch

from cign_train.losses import cign_loss
from cign_train.methods.base import Inputs, Method, Task
from cign_train.model import CIGN


class CignMethod(Method):
    NAME = "cign"
    NEEDS_BUFFER = True

    teacher: CIGN | None = None

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model: its tokens c^{t-1} (eq 8) and features g^{t-1} (eq 9)."""
        if task.index == 0:
            self.teacher = None
            return
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(batch.spectrograms, batch.frames)
        return cign_loss(
            out,
            batch.labels,
            cfg=self.cfg,
            token_logits=self.model.token_logits(),
            tokens=self.model.tokens,
            old_tokens=None if self.teacher is None else self.teacher.tokens,
            teacher_out=teacher_out,
            old_classes=self.task.old_classes,
            new_classes=self.task.new_classes,
        )

    def end_task(self, task: Task) -> None:
        """Drop the teacher; the next task freezes a fresh one."""
        self.teacher = None
