"""Accuracy of audio, visual and audio-visual predictions on each seen task's evaluation split.

The split is ``val`` while choosing hyperparameters and ``test`` only to report (``--eval-split``).

Prediction is class-incremental (no task id): argmax over all classes seen so far of p_a, of p_v,
and of p_av = p_a * p_v (Sec. 3.3), as the method's ``predict`` gives them (the model's heads by
default; e.g. iCaRL's nearest-mean classifier replaces them). Under DDP each rank scores a shard and
the counts are summed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from cign_train import distributed as D
from cign_train.data.loader import batch_loader
from cign_train.metrics import seen_accuracy

MODALITIES = ("audio", "visual", "audio_visual")


class TaskAccuracy(NamedTuple):
    per_task: dict[str, list[float]]  # modality -> accuracy (%) on each seen task's evaluation split
    seen: dict[str, float]  # modality -> accuracy (%) on the union of the seen tasks' evaluation splits
    eval_clips: list[int]  # clips scored per seen task (all ranks together)

    def append_to(self, rows: dict[str, list[list[float]]], seen: dict[str, list[float]]) -> None:
        """Add this step to a run's accuracy matrix rows and seen-class accuracies, per modality."""
        for m in MODALITIES:
            rows[m].append(self.per_task[m])
            seen[m].append(self.seen[m])


@torch.no_grad()
def evaluate_tasks(method, plan, t: int, to_inputs, autocast, batch_size: int, workers: int, dist: D.Dist,
                   split: str = "test") -> TaskAccuracy:
    """Score ``method.predict`` after task ``t`` on the ``split`` clips of tasks 0..t (the model in eval mode)."""
    method.model.eval()
    # correct per modality, then total; kept on the device so scoring a batch needs no host sync
    counts = torch.zeros(t + 1, len(MODALITIES) + 1, dtype=torch.float64, device=dist.device)
    for i in range(t + 1):
        idx = plan.split_indices(split, plan.task_classes[i])[dist.rank :: dist.world]
        if len(idx) == 0:
            continue
        for batch in batch_loader(plan.store, idx, batch_size, shuffle=False, workers=workers):
            x = to_inputs(batch)
            with autocast():
                p = method.predict(x)
            for m, probs in enumerate((p.p_a, p.p_v, p.p_av)):
                counts[i, m] += (probs.float().argmax(dim=1) == x.labels).sum()
            counts[i, -1] += len(x.labels)
    counts = D.all_reduce_sum(counts, dist).cpu().numpy()
    total = counts[:, -1]
    if (total == 0).any():
        empty = [i for i in range(t + 1) if total[i] == 0]
        raise ValueError(f"tasks {empty} have no {split} samples in {plan.store.root}")
    per_task = {m: [float(100 * c) for c in counts[:, j] / total] for j, m in enumerate(MODALITIES)}
    seen = {m: 100 * seen_accuracy(counts[:, j], total) for j, m in enumerate(MODALITIES)}
    return TaskAccuracy(per_task, seen, [int(n) for n in total])
