"""EWC (Kirkpatrick et al., PNAS 2017): fine-tuning plus a quadratic pull of every weight towards its
value after the previous tasks, weighted by its diagonal Fisher information (eq 3 of the paper)."""
from __future__ import annotations

import torch

from cign_train.losses import grouping_bce
from cign_train.methods.base import Inputs, Option, Task, TaskData
from cign_train.methods.finetune import Finetune

#: Parameters whose shape grows with the classes (the token table and its classifier) are not
#: regularised: their new rows have no previous value.
GROWING = ("tokens", "token_cls.weight", "token_cls.bias")


class EWC(Finetune):
    """L = L_finetune + lambda / 2 * sum_j F_j (theta_j - theta*_j)^2, no rehearsal buffer.

    After each task the diagonal Fisher F_j = E[(d L / d theta_j)^2] is estimated on the task's
    training clips from the gradient of eq 8's BCE at the true labels (the empirical Fisher, one
    gradient per batch scaled by its size, as FACIL does), in eval mode so that BatchNorm's running
    statistics stay as trained. Over tasks the Fisher is merged as alpha F_old + (1 - alpha) F_new
    (FACIL's multi-task EWC; Kirkpatrick et al. keep one penalty per task). Defaults are FACIL's
    (Masana et al., TPAMI 2022, EWC: lamb 5000, alpha 0.5).
    """

    NAME = "ewc"
    NEEDS_BUFFER = False
    OPTIONS = (
        Option("ewc_lambda", 5000.0, "Weight lambda of the penalty (EWC eq 3; FACIL's default)."),
        Option("ewc_alpha", 0.5, "Weight of the old Fisher when merging it with the new task's (FACIL's default)."),
    )

    fisher: dict[str, torch.Tensor] | None = None
    anchor: dict[str, torch.Tensor] | None = None

    def regularised(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in GROWING}

    def penalty(self) -> torch.Tensor:
        """lambda / 2 * sum_j F_j (theta_j - theta*_j)^2; 0 before the first task has ended."""
        if self.fisher is None:
            return self.model.tokens.new_zeros(())
        total = sum((self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.regularised().items())
        return self.options["ewc_lambda"] / 2 * total

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        terms = super().observe(batch)
        ewc = self.penalty()
        return {**terms, "ewc": ewc, "total": terms["total"] + ewc}

    def state_dict(self) -> dict:
        return {} if self.fisher is None else {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        if state:
            device = self.model.tokens.device
            self.fisher, self.anchor = ({n: t.to(device) for n, t in state[k].items()} for k in ("fisher", "anchor"))

    def end_task(self, task: Task, data: TaskData) -> None:
        """Estimate the task's Fisher, merge it into the running one and anchor at the current weights."""
        params = self.regularised()
        new = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.model.training
        self.model.eval()
        seen = 0
        for batch in data.clips():
            out = self.model(batch.spectrograms, batch.frames)
            grads = torch.autograd.grad(grouping_bce(out.logits_a, out.logits_v, batch.labels), list(params.values()),
                                        allow_unused=True)
            n = len(batch.labels)
            for name, g in zip(params, grads):
                if g is not None:
                    new[name] += g.detach().float().pow(2) * n
            seen += n
        self.model.train(was_training)
        new = {n: f / max(seen, 1) for n, f in new.items()}
        alpha = self.options["ewc_alpha"]
        self.fisher = new if self.fisher is None else {n: alpha * self.fisher[n] + (1 - alpha) * new[n] for n in new}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
