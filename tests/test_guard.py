"""The step guard on a real CIGN model: a non-finite gradient is never applied.

The fault is injected as oneDNN's showed itself: NaN in the gradient of the audio encoder's second
convolution (``audio_encoder.backbone.1.0.weight``) while the loss stays finite.
"""
from __future__ import annotations

import copy

import pytest
import torch

from cign_train.guard import StepGuard, gradient_norm
from cign_train.methods import get_method
from tiny import at_task, inputs

pytestmark = pytest.mark.usefixtures("one_thread")

POISONED = "audio_encoder.backbone.1.0.weight"


def poison(model: torch.nn.Module, calls: int) -> list[int]:
    """Make the first ``calls`` gradients of the poisoned weight NaN; returns the list of calls seen."""
    seen: list[int] = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return torch.full_like(grad, float("nan")) if len(seen) <= calls else grad

    dict(model.named_parameters())[POISONED].register_hook(hook)
    return seen


def setup(mixed: bool, calls: int):
    """A CIGN method at its second task (teacher and old classes present), Adam, and a guarded step."""
    method = at_task(get_method("cign"), 1)
    model = method.model.train()
    reference = copy.deepcopy(method)  # the same model, never poisoned
    seen = poison(model, calls)
    return method, model, reference, seen


def guarded_step(method, guard: StepGuard, optimizer, x, mixed: bool):
    guard.capture()
    with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
        loss = method.observe(x)["total"]
    return guard.step(loss, lambda: method.observe(x)["total"], optimizer, torch.amp.GradScaler("cuda", enabled=False))


def fp32_step(method, x) -> None:
    optimizer = torch.optim.Adam(method.model.parameters(), lr=1e-3)
    optimizer.zero_grad(set_to_none=True)
    method.observe(x)["total"].backward()
    optimizer.step()


X = inputs(0, [0, 1, 2, 0, 1, 2, 2, 1])


def test_a_nan_gradient_under_bf16_is_redone_in_fp32_from_the_same_state():
    method, model, reference, seen = setup(mixed=True, calls=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = StepGuard(model, redo=True)
    norm, action = guarded_step(method, guard, optimizer, X, mixed=True)
    assert action == "fp32" and guard.counts == {"fp32": 1, "skipped": 0} and len(seen) == 2
    assert norm > 0 and torch.isfinite(torch.tensor(norm))
    # what was applied is the fp32 step of the unpoisoned model from the same weights and statistics:
    # BatchNorm's running statistics were updated once, not once per forward
    fp32_step(reference, X)
    got, want = model.state_dict(), reference.model.state_dict()
    for name in want:
        assert torch.isfinite(got[name].float()).all(), name
        assert torch.allclose(got[name].float(), want[name].float(), atol=1e-6), name


def test_a_gradient_that_stays_nan_is_skipped_and_updates_nothing():
    method, model, _, seen = setup(mixed=True, calls=10**6)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = StepGuard(model, redo=True)
    norm, action = guarded_step(method, guard, optimizer, X, mixed=True)
    assert action == "skipped" and guard.counts == {"fp32": 0, "skipped": 1} and len(seen) == 2
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert not optimizer.state  # no Adam moment took the NaN either
    assert all(p.grad is None for p in model.parameters())


def test_in_fp32_a_nan_gradient_is_skipped_without_a_redo():
    method, model, _, seen = setup(mixed=False, calls=1)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = StepGuard(model, redo=False)
    _, action = guarded_step(method, guard, optimizer, X, mixed=False)
    assert action == "skipped" and len(seen) == 1  # recomputing in fp32 would give the same gradient
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    _, action = guarded_step(method, guard, optimizer, X, mixed=False)  # the next step is clean: applied
    assert action is None and guard.counts == {"fp32": 0, "skipped": 1}
    assert not torch.equal(dict(model.named_parameters())[POISONED], before[POISONED])


def test_a_finite_step_is_the_plain_step_and_reports_the_gradient_norm():
    method, model, reference, _ = setup(mixed=False, calls=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    norm, action = guarded_step(method, StepGuard(model, redo=False), optimizer, X, mixed=False)
    assert action is None
    assert norm == pytest.approx(float(gradient_norm(optimizer)), rel=1e-6)
    fp32_step(reference, X)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.model.state_dict().values()))
