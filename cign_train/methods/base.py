"""The continual-learning method interface the trainer drives (Mammoth's begin_task/observe/end_task).

The trainer owns everything methods share: growing the class-token table, optimizers, AMP,
DDP, the rehearsal buffer, evaluation, checkpoints and logs. A method decides only what the
model learns from one batch, plus what it keeps between tasks. Per task the trainer calls

1. ``begin_task(task)``: the model is still the previous task's (not yet grown), so this is the
   moment to keep a frozen copy of it;
2. it grows the model by ``task.new_classes`` and trains: ``observe(batch)`` once per step,
   returning named loss terms whose ``total`` it back-propagates;
3. ``end_task(task)`` after the last epoch, before the buffer update and evaluation.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig
from cign_train.model import CIGN


class Task(NamedTuple):
    index: int
    old_classes: tuple[int, ...]  # model class indices seen in earlier tasks
    new_classes: tuple[int, ...]  # this task's classes (they follow the old ones)


class Inputs(NamedTuple):
    spectrograms: torch.Tensor  # (B, F, T) normalised
    frames: torch.Tensor  # (B, 3, H, W) normalised
    labels: torch.Tensor  # (B,) model class indices


class Method:
    """Base class: subclasses set ``NAME`` and ``NEEDS_BUFFER`` and implement ``observe``."""

    NAME: ClassVar[str]
    NEEDS_BUFFER: ClassVar[bool]
    #: True: each task trains on every seen class's full training data (the joint upper bound),
    #: not only the new classes' (plus the buffer when ``NEEDS_BUFFER``).
    TRAINS_ON_SEEN: ClassVar[bool] = False

    def __init__(self, model: CIGN, cfg: CIGNConfig):
        for attr in ("NAME", "NEEDS_BUFFER"):
            if not hasattr(type(self), attr):
                raise TypeError(f"{type(self).__name__} must define {attr}")
        self.model = model  # the bare module: token table, teacher copies
        self.forward: nn.Module = model  # what to call for outputs (the DDP wrapper when distributed)
        self.cfg = cfg
        self.task: Task | None = None

    def begin_task(self, task: Task) -> None:
        """Called before the model grows by ``task.new_classes``; the default keeps nothing."""

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement observe")

    def diagnose(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """Task-end diagnostics on a batch of rehearsal exemplars (old classes), called before
        ``end_task``; each value is a batch mean, logged as is. The default has none."""
        return {}

    def end_task(self, task: Task) -> None:
        """Called after the task's last epoch; the default keeps nothing."""
