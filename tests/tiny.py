"""What the method tests share: the tiny model config, random inputs, and a method at a given task."""
from __future__ import annotations

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig
from cign_train.methods import Inputs, Method, Task
from cign_train.model import CIGN, CIGNOutput

#: cnn8 encoders at D 32 with one phi layer: spectrograms (B, 32, 40), frames (B, 3, 64, 64).
TINY = CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4)


def inputs(seed: int, labels: list[int], channels: int = 3) -> Inputs:
    """Random spectrograms and frames for ``labels`` (model class indices)."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return Inputs(torch.randn(n, 32, 40, generator=g), torch.randn(n, channels, 64, 64, generator=g),
                  torch.tensor(labels))


def at_task(cls: type[Method], index: int, cfg: CIGNConfig = TINY, **options) -> Method:
    """A ``cls`` method over a 2-class model that has begun tasks 0..``index``, as the trainer drives it:
    begin_task, then the grow by one class for every task after the first."""
    torch.manual_seed(0)
    model = CIGN(cfg, n_classes=2)
    method = cls(model, cfg, options)
    for t in range(index + 1):
        method.task = Task(t, tuple(range(1 + t)), (1 + t,)) if t else Task(0, (), (0, 1))
        method.begin_task(method.task)
        if t:
            model.grow(1)
    return method


class GivenLogits(nn.Module):
    """Stands in for the model where a method only reads the heads' logits: its inputs are the audio
    and visual logits (passed as spectrograms and frames)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, 1))  # where the method reads the device

    def forward(self, logits_a, logits_v):
        return CIGNOutput(logits_a, logits_v, None, None, None, None)
