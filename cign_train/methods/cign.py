"""CIGN (paper Sec. 3): class-token distillation + continual grouping against a frozen copy of the
previous task's model, trained on the task's data plus the rehearsal buffer (eqs 8-10)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from cign_train.losses import cign_loss
from cign_train.methods.base import Inputs, Method, Task, TaskData
from cign_train.model import CIGN, CIGNOutput


class CignMethod(Method):
    NAME = "cign"
    NEEDS_BUFFER = True
    LOSS_OPTIONS = ("no_avctd", "no_avcg", "ctl_denominator", "ctl_negatives", "token_source", "teacher_bn", "tau", "kl_temperature")

    teacher: CIGN | None = None

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model: its tokens c^{t-1} (eq 8) and features g^{t-1} (eq 9).

        The teacher is in eval mode (no dropout; hard assignment takes the argmax), except that
        cfg.teacher_bn ``batch`` (default) runs its BatchNorm layers on the batch's statistics,
        as the student's are in training (momentum 0 keeps its running estimates unchanged), so that
        teacher and student differ only by their weights and the new tokens; ``running`` uses its
        running estimates (eval mode), a train / eval mismatch that eqs 8-9 would pull against: at task
        2's first step the anchor-positive cosine of g is 0.975 audio / 0.9998 visual with ``batch``,
        0.966 / 0.987 with ``running`` (benchmarks/studies/bench_first_step.py, 3 seeds).
        """
        if task.index == 0:
            self.teacher = None
            return
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)  # no dropout, argmax assignment
        if self.cfg.teacher_bn == "batch":
            for m in self.teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
                    m.train()

    @torch.no_grad()
    def teacher_features(self, batch: Inputs) -> CIGNOutput | None:
        """The teacher's outputs on the whole batch (the KL of eq 8 reads every sample's old-class
        tokens; eq 9 reads the old-class samples' g^{t-1}), or None when no term needs them."""
        needs = self.cfg.use_avcg or (self.cfg.use_avctd and self.cfg.token_source == "contextual")
        if self.teacher is None or not needs:
            return None
        return self.teacher(batch.spectrograms, batch.frames)

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        return cign_loss(
            out,
            batch.labels,
            cfg=self.cfg,
            token_logits=self.model.token_logits,
            tokens=self.model.tokens,
            old_tokens=None if self.teacher is None else self.teacher.tokens,
            teacher_out=self.teacher_features(batch),
            old_classes=self.task.old_classes,
            new_classes=self.task.new_classes,
        )

    @torch.no_grad()
    def diagnose(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """How far the student drifted from the teacher on old-class exemplars: the cosine of their
        class-aware features g_i at the exemplar's class (eq 9's anchor and positive), per modality,
        both in eval mode (running BatchNorm statistics)."""
        if self.teacher is None:
            return {}
        rows = torch.arange(batch.labels.shape[0], device=batch.labels.device)
        modes = [(m, m.training) for net in (self.model, self.teacher) for m in net.modules()]
        self.model.eval(), self.teacher.eval()
        student = self.model(batch.spectrograms, batch.frames)
        teacher = self.teacher(batch.spectrograms, batch.frames)
        for m, training in modes:  # per module: the teacher's BatchNorm layers may train alone
            m.training = training
        return {f"diag/teacher_student_cos_{m}": F.cosine_similarity(
                    t[rows, batch.labels].float(), s[rows, batch.labels].float(), dim=-1).mean()
                for m, t, s in (("a", teacher.g_a, student.g_a), ("v", teacher.g_v, student.g_v))}

    def end_task(self, task: Task, data: TaskData) -> None:
        """Drop the teacher; the next task freezes a fresh one."""
        self.teacher = None
