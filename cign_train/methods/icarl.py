"""iCaRL (Rebuffi et al., CVPR 2017): rehearsal, sigmoid distillation of the previous model's outputs
(Algorithm 3) and classification by the nearest mean of exemplars (Algorithm 1)."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from cign_train.losses import token_independence
from cign_train.methods.base import Inputs, Method, Option, Task, TaskData
from cign_train.model import CIGN, Prediction


def icarl_bce(logits: torch.Tensor, labels: torch.Tensor,
              old_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One modality's Algorithm 3 loss as (new, old) terms, each summed over its classes, batch mean, fp32.

    logits (B, K) are the current model's, old_logits (B, C) the previous model's on the same batch
    (no gradient; C = 0 at the first task). new: BCE of the new classes' logits (columns C..K-1)
    against the one-hot labels, 0 for the old-class exemplars; old: BCE of the old classes' logits
    against q = sigmoid(old_logits), the previous model's outputs as soft targets.
    """
    c = old_logits.shape[1]
    y = F.one_hot(labels, logits.shape[1])[:, c:].float()  # (B, K - C)
    q = old_logits.detach().float().sigmoid()  # (B, C)
    new = F.binary_cross_entropy_with_logits(logits[:, c:].float(), y, reduction="none").sum(dim=1).mean()
    old = F.binary_cross_entropy_with_logits(logits[:, :c].float(), q, reduction="none").sum(dim=1).mean()
    return new, old


def features(model: CIGN, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(x) per modality, L2-normalised (Sec. 2.1, Architecture), fp32: the audio encoder's (B, D) and
    the visual encoder's averaged over its P patches (B, P, D) -> (B, D), as herding reads them."""
    f_a, f_v = model.encoder_features(x.spectrograms, x.frames)
    return F.normalize(f_a.float(), dim=-1), F.normalize(f_v.float(), dim=-1)


@torch.no_grad()
def class_means(model: CIGN, exemplars: Iterable[Inputs], n_classes: int) -> torch.Tensor:
    """mu_y = mean of phi(p) over class y's exemplars p, re-normalised (Algorithm 1, Sec. 2.1), per
    modality: (2, K, D), audio then visual. A ValueError names any class without an exemplar."""
    device = model.tokens.device
    sums = torch.zeros(2, n_classes, model.cfg.dim, device=device)
    counts = torch.zeros(n_classes, device=device)
    for x in exemplars:
        sums.index_add_(1, x.labels, torch.stack(features(model, x)))
        counts.index_add_(0, x.labels, torch.ones_like(x.labels, dtype=counts.dtype))
    if (counts == 0).any():
        raise ValueError(f"classes {(counts == 0).nonzero().flatten().tolist()} have no exemplar to average")
    return F.normalize(sums / counts[:, None], dim=-1)


def nme_probabilities(phi: torch.Tensor, means: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over the classes of phi . mu_y / tau, (B, D) x (K, D) -> (B, K).

    For unit vectors ||phi - mu_y||^2 = 2 - 2 phi . mu_y, so this is softmax(-||phi - mu_y||^2 / 2 tau):
    its argmax is Algorithm 1's argmin_y ||phi - mu_y||, whatever tau. In fp32 (autocast off): bf16's
    three significant digits would tie close cosines.
    """
    with torch.autocast(phi.device.type, enabled=False):
        return torch.softmax(phi.float() @ means.float().T / temperature, dim=1)


class ICaRL(Method):
    """Trains on the task's clips plus the rehearsal buffer with L = sum_{m in a, v} (new_m + old_m)
    (``icarl_bce``, Algorithm 3; the heads are already per-class sigmoids, distilled per modality)
    plus the new tokens' CE that every baseline here keeps (Finetune), and classifies by the nearest
    mean of exemplars (Algorithm 1) instead of the heads.

    The features are the encoders' (``features``), the network part before the class tokens. At each
    task's end the class means of every seen class are recomputed from the buffer with the current
    encoders, in eval mode. p_m = ``nme_probabilities`` per modality m, so p_av = p_a * p_v is
    proportional to exp(-(||phi_a - mu_a||^2 + ||phi_v - mu_v||^2) / 2 tau): its argmax is the class
    nearest in both modalities together, and tau changes no prediction.

    The teacher is the model before it grows, frozen, in eval mode (Algorithm 3 stores q from the
    previous network before training). iCaRL selects exemplars by herding (Algorithm 4): this method's
    default ``--buffer-select herding`` (the trainer selects, on the encoder features), kept as a fixed
    number per class rather than iCaRL's fixed total (Algorithm 5).
    """

    NAME = "icarl"
    NEEDS_BUFFER = True
    SETTINGS = {"buffer_select": "herding"}  # Algorithm 4
    OPTIONS = (
        Option("icarl_temperature", 0.1,
               "Temperature tau of the softmax over cosine similarities to the class means; iCaRL only takes the "
               "argmin (Algorithm 1), which tau does not change: it sets how peaked the probabilities are."),
    )

    teacher: CIGN | None = None
    means: torch.Tensor | None = None  # (2, K, D) unit class means, audio then visual

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model (none before the first task)."""
        self.teacher = None if task.index == 0 else copy.deepcopy(self.model).requires_grad_(False).eval()

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """Terms ``bce`` (the new classes' BCE), ``distill`` (the old classes'), ``ce`` and ``total``."""
        out = self.forward(batch.spectrograms, batch.frames)
        if self.teacher is None:
            prev_a = prev_v = out.logits_a[:, :0]  # no old classes
        else:
            with torch.no_grad():
                teacher = self.teacher(batch.spectrograms, batch.frames)
            prev_a, prev_v = teacher.logits_a, teacher.logits_v
        new_a, old_a = icarl_bce(out.logits_a, batch.labels, prev_a)
        new_v, old_v = icarl_bce(out.logits_v, batch.labels, prev_v)
        bce, distill = new_a + new_v, old_a + old_v
        ce = token_independence(self.model.token_logits(), self.task.new_classes)
        return {"bce": bce, "distill": distill, "ce": ce, "total": bce + distill + ce}

    def predict(self, batch: Inputs) -> Prediction:
        if self.means is None:
            raise RuntimeError("iCaRL classifies by class means, which end_task computes or load_state_dict restores")
        tau = self.options["icarl_temperature"]
        p_a, p_v = (nme_probabilities(phi, mu, tau) for phi, mu in zip(features(self.model, batch), self.means))
        return Prediction(p_a, p_v, p_a * p_v)

    def state_dict(self) -> dict:
        return {} if self.means is None else {"class_means": self.means}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.means = state["class_means"].to(self.model.tokens.device)

    def end_task(self, task: Task, data: TaskData) -> None:
        """Drop the teacher and compute every seen class's mean from the buffer's exemplars."""
        self.teacher = None
        was_training = self.model.training
        self.model.eval()
        self.means = class_means(self.model, data.exemplars(), self.model.n_classes)
        self.model.train(was_training)
