"""SS-IL (Ahn et al., ICCV 2021, "SS-IL: Separated Softmax for Incremental Learning"): rehearsal with a
separated softmax (Sec. 4.1, L_SS) and task-wise knowledge distillation from the previous task's frozen
model (Sec. 4.3, L_TKD); L_SS-IL = L_SS + L_TKD."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cign_train.losses import token_independence
from cign_train.methods.base import Inputs, Method, Option, Task, TaskData
from cign_train.model import CIGN


def separated_softmax(logits: torch.Tensor, labels: torch.Tensor, new_classes: Sequence[int]) -> torch.Tensor:
    """L_SS (Sec. 4.1): a sample of a new class is scored by a softmax over the new classes' logits only,
    a buffer sample (an old class) by one over the old classes' logits only; summed CE over the batch
    divided by its size (as the authors' code does).

    logits (B, K) with the old classes first, labels (B,) class indices. Masking the other group's
    logits to -inf makes each row's softmax one of its own group and leaves those logits no gradient.
    """
    new = torch.as_tensor(list(new_classes), dtype=labels.dtype, device=labels.device)
    sample_new = torch.isin(labels, new)  # (B,)
    column_new = torch.isin(torch.arange(logits.shape[1], device=labels.device), new)  # (K,)
    own_group = sample_new[:, None] == column_new[None, :]  # (B, K)
    masked = logits.float().masked_fill(~own_group, float("-inf"))
    return F.cross_entropy(masked, labels, reduction="sum") / labels.shape[0]


def task_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, tasks: Sequence[Sequence[int]],
                      temperature: float) -> torch.Tensor:
    """L_TKD (Sec. 4.3): sum over the earlier tasks s of KL(p_T(teacher, C_s) || p_T(student, C_s)), each a
    softmax at temperature T over task s's classes' logits only, batch mean, scaled by T^2 (Hinton et
    al.'s convention, as the authors' code does). logits (B, K), teacher_logits (B, C) with C the earlier
    classes (no gradient); in fp32."""
    total = logits.new_zeros((), dtype=torch.float32)
    for classes in tasks:
        idx = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
        log_q = F.log_softmax(logits[:, idx].float() / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.detach()[:, idx].float() / temperature, dim=1)
        total = total + (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return total * temperature**2


class SSIL(Method):
    """L = L_SS + w L_TKD per modality (audio and visual heads' per-class logits, summed), plus the
    network's token CE over the new tokens (eq 8's second term, as in every baseline here).

    The paper draws each batch with new and old samples in the ratio of their counts
    (ratio-preserving mini-batch, Sec. 4.2): the trainer's ``--rehearsal-sampling uniform`` (every
    clip of the task and the buffer equally likely, so that ratio in expectation), this method's
    default; the trainer's class-balanced default starves the new classes of
    L_SS's new-class softmax (first look, seed 0, val: the tasks after the first reached 35-82 %
    audio-visual right after learning them). The teacher is the previous task's model, frozen in eval mode; L_TKD needs the earlier
    tasks' class lists, kept as method state so that a resume continues them.
    """

    NAME = "ss_il"
    NEEDS_BUFFER = True
    SETTINGS = {"rehearsal_sampling": "uniform"}  # Sec. 4.2, ratio-preserving batches
    OPTIONS = (
        Option("ss_il_temperature", 2.0, "Temperature T of L_TKD's softmaxes (Sec. 4.3; T = 2 in the authors' code)."),
        Option("ss_il_tkd_weight", 1.0, "Weight w of L_TKD (the paper adds it unweighted: L_SS-IL = L_SS + L_TKD)."),
    )

    teacher: CIGN | None = None
    #: The class lists of the finished tasks, in order (L_TKD's C_s).
    task_classes: tuple[tuple[int, ...], ...] = ()

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model (before it grows) as L_TKD's teacher."""
        if tuple(k for c in self.task_classes for k in c) != task.old_classes:
            raise RuntimeError(f"ss_il: the finished tasks' classes {self.task_classes} do not make up task "
                               f"{task.index}'s old classes {task.old_classes} (a resume without the method state?)")
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval() if self.task_classes else None

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        new = self.task.new_classes
        ss = separated_softmax(out.logits_a, batch.labels, new) + separated_softmax(out.logits_v, batch.labels, new)
        tkd = ss.new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher(batch.spectrograms, batch.frames)
            t = self.options["ss_il_temperature"]
            tkd = (task_distillation(out.logits_a, old.logits_a, self.task_classes, t)
                   + task_distillation(out.logits_v, old.logits_v, self.task_classes, t))
        ce = token_independence(self.model.token_logits(), new)
        return {"ss": ss, "tkd": tkd, "ce": ce, "total": ss + self.options["ss_il_tkd_weight"] * tkd + ce}

    def state_dict(self) -> dict:
        return {"task_classes": [list(c) for c in self.task_classes]}

    def load_state_dict(self, state: dict) -> None:
        self.task_classes = tuple(tuple(int(k) for k in c) for c in state.get("task_classes", ()))

    def end_task(self, task: Task, data: TaskData) -> None:
        """Record the task's classes for the next tasks' L_TKD and drop the teacher."""
        self.task_classes = (*self.task_classes, tuple(task.new_classes))
        self.teacher = None
