"""CIGN (paper Sec. 3): class-token distillation + continual grouping against a frozen copy of the
previous task's model, trained on the task's data plus the rehearsal buffer (eqs 8-10)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cign_train.losses import cign_loss
from cign_train.methods.base import Inputs, Method, Task
from cign_train.model import CIGN, CIGNOutput


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

    @torch.no_grad()
    def teacher_features(self, batch: Inputs, out: CIGNOutput) -> CIGNOutput | None:
        """The teacher's g^{t-1} on the batch's old-class samples, the only anchors of eq 9.

        Rows of other samples are left zero: eq 9 never reads them, so the teacher skips them.
        """
        if self.teacher is None or not self.cfg.use_avcg:
            return None
        old = torch.isin(batch.labels, torch.as_tensor(self.task.old_classes, device=batch.labels.device))
        b, c = batch.labels.shape[0], self.teacher.n_classes
        g_a = out.g_a.new_zeros(b, c, out.g_a.shape[-1])  # (B, C, D)
        g_v = out.g_v.new_zeros(b, c, out.g_v.shape[-1])  # (B, C, D)
        if old.any():
            t = self.teacher(batch.spectrograms[old], batch.frames[old])
            g_a[old], g_v[old] = t.g_a.to(g_a.dtype), t.g_v.to(g_v.dtype)
        return CIGNOutput(None, None, g_a, g_v)  # eq 9 reads only the class-aware features

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        teacher_out = self.teacher_features(batch, out)
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

    @torch.no_grad()
    def diagnose(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """How far the student drifted from the teacher on old-class exemplars: the cosine of their
        class-aware features g_i at the exemplar's class (eq 9's anchor and positive), per modality,
        both in eval mode (running BatchNorm statistics)."""
        if self.teacher is None:
            return {}
        rows = torch.arange(batch.labels.shape[0], device=batch.labels.device)
        was_training = self.model.training
        self.model.eval()
        student = self.model(batch.spectrograms, batch.frames)
        self.model.train(was_training)
        teacher = self.teacher(batch.spectrograms, batch.frames)
        return {f"diag/teacher_student_cos_{m}": F.cosine_similarity(
                    t[rows, batch.labels].float(), s[rows, batch.labels].float(), dim=-1).mean()
                for m, t, s in (("a", teacher.g_a, student.g_a), ("v", teacher.g_v, student.g_v))}

    def end_task(self, task: Task) -> None:
        """Drop the teacher; the next task freezes a fresh one."""
        self.teacher = None
