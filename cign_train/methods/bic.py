"""BiC (Wu et al., CVPR 2019, "Large Scale Incremental Learning"): rehearsal with distillation from the
previous model (stage 1, Sec. 3, eqs 1-3), then a two-parameter linear correction of the new classes'
logits fitted on a small held-out split of every seen class, the model frozen (stage 2, Sec. 5, eqs 4-5)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cign_train.config import CIGNConfig
from cign_train.methods.base import Inputs, Option, Task, TaskData
from cign_train.methods.finetune import Finetune
from cign_train.methods.lwf import distillation
from cign_train.model import CIGN, CIGNOutput, Prediction, predict


def bias_correction(logits: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq 4 per class: q_k = alpha_k o_k + beta_k for the first C classes, o_k for the others, in fp32.

    logits (B, K), alpha and beta (C,) with C <= K: a task's layer is its two scalars repeated over its
    classes; the classes past C (this task's, before stage 2 fits their layer) are left as they are.
    """
    c = alpha.shape[0]
    logits = logits.float()
    return torch.cat([logits[:, :c] * alpha + beta, logits[:, c:]], dim=1)


class BiC(Finetune):
    """Stage 1, per step: L = (1 - lambda) L_c + lambda L_d (eq 3), lambda = n / (n + m) for n old and m
    new classes (Sec. 3). L_c is fine-tuning's terms (eq 8's BCE over every seen class, the new tokens'
    CE) in place of the paper's softmax CE; L_d is LwF's distillation of the old classes' logits (eq 1:
    softmax at T = 2, no T^2 factor), audio and visual summed. The logged terms are weighted (they sum
    to ``total``). The teacher is the previous model, frozen, in eval mode, with every bias layer
    applied (BiC distils corrected outputs); the student's logits pass the earlier tasks' (fixed) layers
    too, as in BiC, where they follow the FC layer, so it learns the corrected targets through the
    layers that correct it at prediction (distilled raw, it would be corrected twice).

    Stage 2 (``end_task``): this task's alpha, beta per modality (from 1, 0) act on its classes' logits
    only (eq 4) and minimise the cross-entropy of softmax(q) over every seen class on the holdout (eq 5).
    The model is frozen: its holdout logits are computed once, in eval mode, then Adam takes one
    full-batch step per epoch (Mammoth's BiC: Adam, lr 1e-3, 250 epochs; BiC's code, as FACIL ports it:
    SGD, momentum 0.9, and an L2 term on beta the paper has not). The first task's layer is the identity (no old
    classes; BiC corrects from the second step), though the trainer withholds its holdout too.

    Prediction: every layer on its own classes' logits, then p = sigmoid(q) per modality, p_av = p_a p_v.
    Eq 5 fits the layer with a softmax while these heads are per-class sigmoids; prediction is an argmax
    over classes and the sigmoid is increasing, so the argmax of sigmoid(q) is that of q, which eq 5
    trains to pick the true class. p_av is not fitted itself; it inherits both modalities' rankings.
    """

    NAME = "bic"
    NEEDS_BUFFER = True
    OPTIONS = (
        Option("bic_holdout", 5, "Clips per seen class held out of stage 1 to fit the bias layer on (BiC Sec. 6.1: "
                                 "a 9:1 train:validation split of the exemplars, 5 of 50 per class)."),
        Option("bic_temperature", 2.0, "Temperature T of the distillation (BiC Sec. 6.2: T = 2)."),
        Option("bic_epochs", 250, "Stage-2 epochs, one full-batch Adam step each (Mammoth's BiC: 250)."),
        Option("bic_lr", 1e-3, "Stage-2 Adam learning rate (Mammoth's BiC: 1e-3; BiC's code uses SGD)."),
    )

    teacher: CIGN | None = None
    #: The bias layers: ``alpha``, ``beta`` (2, tasks), rows audio and visual, one column per finished task
    #: (the first's the identity), and ``task`` (K,) the task each class was learned in.
    layers: dict[str, torch.Tensor] | None = None

    def __init__(self, model: CIGN, cfg: CIGNConfig, options: dict | None = None):
        super().__init__(model, cfg, options)
        if self.options["bic_holdout"] < 1:
            raise ValueError(f"bic_holdout must be at least 1 (stage 2 fits on those clips), got "
                             f"{self.options['bic_holdout']}")
        self.HOLDOUT = self.options["bic_holdout"]

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and beta of every class with a layer (2, C), from its task's column."""
        s = self.layers
        return s["alpha"][:, s["task"]], s["beta"][:, s["task"]]

    def corrected(self, out: CIGNOutput) -> CIGNOutput:
        """``out`` with every fitted bias layer applied to its own classes' audio and visual logits."""
        if self.layers is None:
            return out
        alpha, beta = self.per_class()
        return out._replace(logits_a=bias_correction(out.logits_a, alpha[0], beta[0]),
                            logits_v=bias_correction(out.logits_v, alpha[1], beta[1]))

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model (before it grows) as the teacher; none before the first task."""
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval() if task.old_classes else None

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        out = self.corrected(self.forward(batch.spectrograms, batch.frames))
        terms = self.terms(out, batch)
        n, m = len(self.task.old_classes), len(self.task.new_classes)
        lam = n / (n + m)
        distill = terms["bce"].new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                old = self.corrected(self.teacher(batch.spectrograms, batch.frames))
            t = self.options["bic_temperature"]
            distill = distillation(out.logits_a, old.logits_a, t) + distillation(out.logits_v, old.logits_v, t)
        bce, ce, distill = (1 - lam) * terms["bce"], (1 - lam) * terms["ce"], lam * distill
        return {"bce": bce, "ce": ce, "distill": distill, "total": bce + ce + distill}

    @torch.no_grad()
    def holdout_logits(self, data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's audio and visual logits on the holdout (2, N, K), in eval mode, and its labels (N,)."""
        was_training = self.model.training
        self.model.eval()
        logits, labels = [], []
        for b in data.holdout():
            out = self.model(b.spectrograms, b.frames)
            logits.append(torch.stack((out.logits_a, out.logits_v)).float())
            labels.append(b.labels)
        self.model.train(was_training)
        if not labels:
            raise ValueError("bic: no holdout clips to fit the bias layer on")
        logits, labels = torch.cat(logits, dim=1), torch.cat(labels)
        missing = sorted(set(range(logits.shape[2])) - set(labels.tolist()))
        if missing:
            raise ValueError(f"bic: the holdout has no clips of classes {missing}")
        return logits, labels

    def end_task(self, task: Task, data: TaskData) -> None:
        """Stage 2: fit this task's layer (eqs 4-5) and keep it with the earlier ones; drop the teacher."""
        self.teacher = None
        device = self.model.tokens.device
        alpha = torch.ones(2, device=device, requires_grad=True)
        beta = torch.zeros(2, device=device, requires_grad=True)
        m = len(task.new_classes)
        if task.old_classes:
            logits, labels = self.holdout_logits(data)
            old_alpha, old_beta = self.per_class()
            optimizer = torch.optim.Adam([alpha, beta], lr=self.options["bic_lr"])
            for _ in range(self.options["bic_epochs"]):
                a = torch.cat([old_alpha, alpha[:, None].expand(2, m)], dim=1)  # (2, K)
                b = torch.cat([old_beta, beta[:, None].expand(2, m)], dim=1)
                loss = sum(F.cross_entropy(bias_correction(logits[i], a[i], b[i]), labels) for i in range(2))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        new = {"alpha": alpha.detach()[:, None], "beta": beta.detach()[:, None],
               "task": torch.full((m,), task.index, dtype=torch.long, device=device)}
        if self.layers is not None:
            new = {k: torch.cat([self.layers[k], v], dim=-1) for k, v in new.items()}
        self.layers = new

    def predict(self, batch: Inputs) -> Prediction:
        """Every bias layer on its classes' logits, then the heads' sigmoids and their product."""
        return predict(self.corrected(self.model(batch.spectrograms, batch.frames)))

    def state_dict(self) -> dict:
        return {} if self.layers is None else {k: v.cpu() for k, v in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.layers = {k: v.to(self.model.tokens.device) for k, v in state.items()}
