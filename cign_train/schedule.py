"""Learning-rate schedules, one per task: each task restarts its schedule on a fresh Adam (Sec. 4.1
trains every task with Adam at a constant 1e-4; ``cosine`` is this toolkit's addition).

``cosine``: a linear warm-up from lr / w to lr over the first ``warmup`` fraction of the task's
steps (w of them), then cosine annealing to 0 over the rest (torch's LinearLR, CosineAnnealingLR
and SequentialLR). Why the ``cpu`` preset uses it is in ``cign_train.settings``.
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

#: --lr-schedule choices.
LR_SCHEDULES = ("constant", "cosine")


def task_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: float) -> LRScheduler:
    """The lr schedule of one task of ``total_steps`` optimizer steps; step it after every optimizer step."""
    if kind == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    if kind != "cosine":
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    w = max(1, round(warmup * total_steps))
    if w >= total_steps:
        raise ValueError(f"warm-up of {w} steps leaves nothing of the task's {total_steps} steps to anneal")
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=1.0 / w, total_iters=w - 1),
                                    CosineAnnealingLR(optimizer, T_max=total_steps - w)], milestones=[w])
