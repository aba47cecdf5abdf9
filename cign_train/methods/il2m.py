"""IL2M (Belouadah & Popescu, ICCV 2019, "IL2M: Class Incremental Learning With Dual Memory"): fine-tuning
with a rehearsal buffer (the first memory) plus a second memory of class statistics, used at inference
to rectify the past classes' scores (Sec. 3, Eq. 1)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from cign_train.methods.base import Inputs, Task, TaskData
from cign_train.methods.finetune import Finetune
from cign_train.model import Prediction, predict


class IL2M(Finetune):
    """Finetune's loss on the task's clips plus the buffer; predictions rectified by Eq. 1, per modality:

        p^r_i = p_i * (mu^P(C_i) / mu^N(C_i)) * (conf(M_N) / conf(M_P))  if the top-1 class is new,
        p^r_i = p_i                                                        otherwise,

    for every past class C_i, where p_i is the class's sigmoid probability (the heads' score; the
    authors' code rectifies raw scores), P the state in which C_i was learned and N the current one;
    mu^P(C_i) is the mean score of class C_i on its own training clips at the end of state P,
    mu^N(C_i) the same mean on its exemplars at the end of state N, and conf(M_S) the model's
    confidence in state S: its mean top-1 score over that state's new-class training clips (the
    authors' code, as FACIL's). The statistics are computed in eval mode after each task and kept as
    method state; p_av = p^r_a * p^r_v. The paper has no hyperparameters of its own.
    """

    NAME = "il2m"
    NEEDS_BUFFER = True

    #: The second memory, per modality (row 0 audio, row 1 visual), over the K classes seen:
    #: ``state`` (K,) the state (task) each class was learned in, ``initial`` (2, K) mu^P,
    #: ``current`` (2, K) mu^N in the latest state (a new class's equals its mu^P), ``confidence``
    #: (2, states) conf(M_S) of each state.
    stats: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def class_scores(self, batches: Iterable[Inputs], classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Over the samples of ``classes`` in ``batches`` (eval mode): each class's mean sigmoid score
        for itself (2, K), NaN for the others, and the mean top-1 score over all K classes (2,)."""
        k, device = self.model.n_classes, self.model.tokens.device
        wanted = torch.zeros(k, dtype=torch.bool, device=device)
        wanted[list(classes)] = True
        sums, counts, top = (torch.zeros(2, k, device=device), torch.zeros(k, device=device),
                             torch.zeros(2, device=device))
        for b in batches:
            out = self.model(b.spectrograms, b.frames)
            keep = wanted[b.labels]
            labels = b.labels[keep]
            p = torch.stack((out.logits_a, out.logits_v)).float().sigmoid()[:, keep]  # (2, B', K)
            sums.index_add_(1, labels, p.gather(2, labels.expand(2, -1)[..., None]).squeeze(-1))
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
            top += p.amax(dim=2).sum(dim=1)
        missing = [c for c in classes if counts[c] == 0]
        if missing:
            raise ValueError(f"il2m: no samples of classes {missing} to compute their statistics from")
        return sums / counts, top / counts.sum()

    def end_task(self, task: Task, data: TaskData) -> None:
        """Add the new classes' mu^P and this state's confidence (from the task's training clips), and
        recompute the past classes' mu^N on their exemplars with the current model."""
        was_training = self.model.training
        self.model.eval()
        new, old = list(task.new_classes), list(task.old_classes)
        means, confidence = self.class_scores(data.clips(), new)
        initial, current, confidence = means, means.clone(), confidence[:, None]
        state = torch.full((self.model.n_classes,), 0 if self.stats is None else self.stats["confidence"].shape[1],
                           dtype=torch.long, device=means.device)
        if old:
            initial[:, old] = self.stats["initial"]
            current[:, old] = self.class_scores(data.exemplars(), old)[0][:, old]
            state[old] = self.stats["state"]
            confidence = torch.cat([self.stats["confidence"], confidence], dim=1)
        self.model.train(was_training)
        self.stats = {"state": state, "initial": initial, "current": current, "confidence": confidence}

    def rectification(self) -> torch.Tensor:
        """Eq. 1's factor (mu^P(C_i) / mu^N(C_i)) * (conf(M_N) / conf(M_P)) of each class (2, K); 1 for
        the latest state's classes."""
        s = self.stats
        return s["initial"] / s["current"] * s["confidence"][:, -1:] / s["confidence"][:, s["state"]]

    def predict(self, batch: Inputs) -> Prediction:
        """Eq. 1 per modality: a sample's past-class scores are rectified where its top-1 class is new."""
        out = self.model(batch.spectrograms, batch.frames)
        if self.stats is None or self.stats["confidence"].shape[1] == 1:
            return predict(out)
        p = torch.stack((out.logits_a, out.logits_v)).float().sigmoid()  # (2, B, K)
        new = self.stats["state"] == self.stats["confidence"].shape[1] - 1  # (K,)
        top_new = new[p.argmax(dim=2)]  # (2, B)
        p = torch.where(top_new[..., None], p * self.rectification()[:, None, :], p)
        return Prediction(p[0], p[1], p[0] * p[1])

    def state_dict(self) -> dict:
        return {} if self.stats is None else {k: v.cpu() for k, v in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.stats = {k: v.to(self.model.tokens.device) for k, v in state.items()}
