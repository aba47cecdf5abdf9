"""LwF (Li & Hoiem, ECCV 2016 / TPAMI 2017), class-incremental: fine-tuning plus knowledge
distillation of the frozen previous model's old-class outputs on the current batch (Sec. 3), no
rehearsal buffer."""
from __future__ import annotations

import copy

import torch

from cign_train.methods.base import Inputs, Option, Task, TaskData
from cign_train.methods.finetune import Finetune
from cign_train.model import CIGN


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF's L_old (eqs 2-3): -sum_{i <= C} y'_i log y_hat'_i, with y' = softmax(z_teacher / T) and
    y_hat' = softmax(z_student,i<=C / T); mean over the batch, in fp32.

    student (B, K) are the current model's logits over every seen class, teacher (B, C) the previous
    model's over the C old classes (no gradient); only the student's first C logits enter. Eq 3 raises
    softmax probabilities to 1 / T and renormalises, which is softmax(z / T). As the paper writes it,
    a cross-entropy: its minimum, at student = teacher, is the entropy of y', not 0 (its gradient is
    the KL divergence's).
    """
    target = torch.softmax(teacher.detach().float() / temperature, dim=1)  # (B, C)
    log_q = torch.log_softmax(student[:, : teacher.shape[1]].float() / temperature, dim=1)  # (B, C)
    return -(target * log_q).sum(dim=1).mean()


class LwF(Finetune):
    """L = L_finetune + lambda_o * sum_{m in a, v} L_old(z_m, z_m^{t-1}) (LwF Sec. 3: L_new + lambda_o L_old + R).

    Fine-tuning's terms (Finetune: eq 8's BCE over every seen class, the new tokens' CE) stand for
    L_new; R, LwF's weight decay, is left out as for every method here. The heads are per-class
    sigmoids, but one FC(g_i) -> 1 produces every class's logit and prediction is their argmax, so
    the old classes' logits are comparable: L_old is the paper's temperature-softened softmax over
    them (eqs 2-3), which keeps how the old model ranks the old classes against each other on new
    data; per-class sigmoid targets are iCaRL's distillation (``icarl``). Audio and visual logits
    are distilled separately and summed. The teacher is the model before it grows, frozen, in eval
    mode (LwF records the old network's responses before training). Defaults are the paper's: T = 2,
    lambda_o = 1 (Sec. 3). Not done: the warm-up that first trains only the new parameters (Sec. 3),
    as fine-tuning has none.
    """

    NAME = "lwf"
    NEEDS_BUFFER = False
    OPTIONS = (
        Option("lwf_lambda", 1.0, "Weight lambda_o of the distillation loss (LwF Sec. 3: 1 in most experiments)."),
        Option("lwf_temperature", 2.0, "Temperature T of the softened old-class outputs (LwF eq 3: T = 2)."),
    )

    teacher: CIGN | None = None

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model (none before the first task)."""
        self.teacher = None if task.index == 0 else copy.deepcopy(self.model).requires_grad_(False).eval()

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.forward(batch.spectrograms, batch.frames)
        terms = self.terms(out, batch)
        lwf = terms["bce"].new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher(batch.spectrograms, batch.frames)
            t = self.options["lwf_temperature"]
            lwf = self.options["lwf_lambda"] * (distillation(out.logits_a, old.logits_a, t)
                                                + distillation(out.logits_v, old.logits_v, t))
        return {**terms, "lwf": lwf, "total": terms["total"] + lwf}

    def end_task(self, task: Task, data: TaskData) -> None:
        """Drop the teacher; the next task freezes a fresh one."""
        self.teacher = None
