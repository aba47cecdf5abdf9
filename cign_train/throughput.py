"""Training-side rates for ``cign-bench --train`` and the benchmarks: one CIGN training step, and the loader.

``step_rate`` times what the trainer does per batch on a task after the first: the student's
forward, the frozen teacher's forward, eqs 8-10, backward and an Adam update through the trainer's
``StepGuard``, on random inputs of a preset's spec, channels_last, in fp32 or under autocast;
``guard_seconds`` times what the guard adds to a step. ``loader_rate`` times ``batch_loader``
over a prepared store (after a warm-up epoch that fills the page cache and starts the workers). A
loader slower than the step means the device waits for data.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from cign_runtime.spec import get_preset
from cign_train.config import CIGNConfig
from cign_train.data.loader import batch_loader
from cign_train.data.store import PreparedStore
from cign_train.guard import StepGuard, gradient_norm
from cign_train.losses import cign_loss
from cign_train.model import CIGN
from cign_train.precision import autocast
from cign_train.settings import PRESETS


def training_step(preset: str, batch: int, device: torch.device, dtype: torch.dtype | None,
                  classes: tuple[int, int] = (10, 10), cfg: CIGNConfig | None = None
                  ) -> tuple[Callable[[], None], StepGuard, torch.optim.Optimizer]:
    """(one step as the trainer takes it, through its ``StepGuard``; the guard; the optimizer) at
    ``preset``'s shapes and model config, or ``cfg`` (``classes``: old and new classes of the task)."""
    cfg, spec = cfg or PRESETS[preset]["model"], get_preset(PRESETS[preset]["spec"])
    torch.manual_seed(0)
    old, new = classes
    model = CIGN(cfg, old).to(device, memory_format=torch.channels_last)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.grow(new)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    spectrograms = torch.randn(batch, *spec.spectrogram_shape, device=device)
    frames = torch.randn(batch, 3, spec.frame_size, spec.frame_size, device=device)
    frames = frames.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch, device=device) % (old + new)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    guard = StepGuard(model, redo=dtype == torch.bfloat16)

    def loss() -> torch.Tensor:
        out = model(spectrograms, frames)
        with torch.no_grad():
            t_out = teacher(spectrograms, frames)
        return cign_loss(out, labels, cfg=cfg, token_logits=model.token_logits, tokens=model.tokens,
                         old_tokens=teacher.tokens, teacher_out=t_out, old_classes=range(old),
                         new_classes=range(old, old + new))["total"]

    def step() -> None:
        guard.capture()
        with autocast(device, dtype):
            value = loss()
        guard.step(value, loss, opt, scaler)

    return step, guard, opt


def step_rate(preset: str, batch: int, steps: int, device: torch.device, dtype: torch.dtype | None,
              classes: tuple[int, int] = (10, 10), cfg: CIGNConfig | None = None) -> float:
    """Samples/s of student + teacher + losses + guarded Adam steps (:func:`training_step`), after one
    warm-up step."""
    step = training_step(preset, batch, device, dtype, classes, cfg)[0]
    step()  # warm-up (allocations, cuDNN autotune)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def guard_seconds(preset: str, batch: int, device: torch.device, dtype: torch.dtype | None, repeats: int = 20) -> float:
    """Seconds per step that the ``StepGuard`` adds when no gradient is non-finite: its capture (RNG and
    BatchNorm statistics, under mixed precision) and the gradients' norm, timed on a real step's gradients."""
    step, guard, opt = training_step(preset, batch, device, dtype)
    step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        guard.capture()
        float(gradient_norm(opt))
    return (time.perf_counter() - start) / repeats


def loader_rate(store: PreparedStore, batch_size: int, workers: int, epochs: int = 1) -> float:
    """Samples/s of ``batch_loader`` over every row of ``store`` (shuffled), after a warm-up epoch."""
    loader = batch_loader(store, np.arange(len(store)), batch_size, shuffle=True, workers=workers)
    for _ in loader:  # warm-up epoch: page cache and worker start, untimed
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch.labels.shape[0]
    return n / (time.perf_counter() - start)
