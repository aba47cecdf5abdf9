"""No optimizer step with a non-finite gradient, whatever its cause.

A finite loss does not make a finite gradient: oneDNN's bf16 convolution weight-gradient on some CPUs
returns NaN at batches of a few clips (``benchmarks/studies/onednn_bf16_conv_grad.py``), and an
update with one NaN entry poisons the weights for good while every loss stays finite. So every step
goes through :meth:`StepGuard.step`: back-propagate, take the gradients' total 2-norm (one fused
reduction, ``torch.nn.utils.get_total_norm``; its cost is in ``benchmarks/bench_train.py``), and

- finite: step the optimizer as usual;
- non-finite under bf16 autocast: redo the step's forward and backward in fp32 on the same inputs,
  from the same RNG state and BatchNorm statistics (:class:`Rewind`), and step if that gradient is
  finite (action ``fp32``); else skip the step (``skipped``);
- non-finite in fp32: redoing computes the same again, so the step is skipped (``skipped``);
- non-finite under fp16: the GradScaler skips the step and lowers its scale, as loss scaling does
  (``skipped``).

A skipped step updates nothing (no weight, no Adam moment); the lr schedule still advances, so a
task keeps its length. The caller logs each action (``steps.jsonl``) and counts them (:attr:`counts`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

#: What the guard did to a step whose first gradient was non-finite.
ACTIONS = ("fp32", "skipped")


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Total 2-norm of the gradients of every parameter the optimizer updates (a 0-d tensor, no sync);
    non-finite when any entry is, and 0 without gradients."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)


class Rewind:
    """The RNG state and a module's buffers (BatchNorm running statistics and counts) as they were
    before a step's forward, so that a redone step starts from the same point: a redo then draws the
    same randomness and updates the statistics once, as a step that needed no redo does."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.buffers: list[torch.Tensor] = []
        self.rng: torch.Tensor | None = None
        self.cuda_rng: list[torch.Tensor] = []

    def capture(self) -> None:
        with torch.no_grad():
            self.buffers = [b.detach().clone() for b in self.module.buffers()]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []

    def restore(self) -> None:
        with torch.no_grad():
            for b, saved in zip(self.module.buffers(), self.buffers):
                b.copy_(saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state_all(self.cuda_rng)


class StepGuard:
    """Optimizer steps that are never taken with a non-finite gradient (module docstring).

    ``module`` is the model whose buffers a redo rewinds; ``redo`` says a non-finite step is redone in
    fp32: the step's forward runs under bf16 autocast (in fp32 a redo computes the same again, under fp16
    the loss scaler skips the step), so only then does :meth:`capture` keep anything. Call it before each
    step's forward, then :meth:`step` with its loss."""

    def __init__(self, module: nn.Module, redo: bool):
        self.rewind = Rewind(module) if redo else None
        self.counts = dict.fromkeys(ACTIONS, 0)

    def capture(self) -> None:
        if self.rewind is not None:
            self.rewind.capture()

    def step(self, loss: torch.Tensor, recompute: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, reduce: Callable[[], None] = lambda: None) -> tuple[float, str | None]:
        """Back-propagate ``loss`` and step ``optimizer`` (through ``scaler``) unless the gradient is
        non-finite; ``recompute()`` returns the same step's loss again (called outside autocast, so in
        fp32), ``reduce()`` completes the gradients after a backward (e.g. averages them across
        processes). Returns (the gradients' 2-norm, unscaled; the action taken or None)."""
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        reduce()
        norm = float(gradient_norm(optimizer)) / scaler.get_scale()
        action = None
        if not math.isfinite(norm):
            action = "skipped"
            if self.rewind is not None:
                self.rewind.restore()
                optimizer.zero_grad(set_to_none=True)
                recompute().backward()
                reduce()
                norm = float(gradient_norm(optimizer))
                if math.isfinite(norm):
                    action = "fp32"
            self.counts[action] += 1
        if action == "skipped" and not scaler.is_enabled():
            optimizer.zero_grad(set_to_none=True)
        else:  # under fp16 the scaler itself skips a step whose gradient holds an inf or NaN
            scaler.step(optimizer)
        scaler.update()
        return norm, action
