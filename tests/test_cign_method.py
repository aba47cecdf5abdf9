"""CIGN's method (eqs 8-10 against a frozen teacher) on a real tiny model at a task's first step:
which terms are non-zero there, which parameters their gradients reach, and the teacher's BatchNorm."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cign_train.config import CIGNConfig
from cign_train.diagnostics import shared_parameters
from cign_train.methods import Inputs, Task
from cign_train.methods.cign import CignMethod
from cign_train.model import CIGN

TINY = CIGNConfig(dim=32, depth=1, heads=4)
BODY = ("audio_encoder", "visual_encoder", "phi_a", "phi_v")


pytestmark = pytest.mark.usefixtures("one_thread")


def batch() -> Inputs:
    g = torch.Generator().manual_seed(0)
    return Inputs(torch.randn(4, 33, 40, generator=g), torch.randn(4, 3, 64, 64, generator=g),
                  torch.tensor([0, 2, 1, 2]))  # old classes 0, 1 from the buffer, new class 2


def first_step(cfg: CIGNConfig) -> tuple[CignMethod, dict[str, torch.Tensor]]:
    """Task 2 (classes 0, 1 old, 2 new) at its first step: the teacher is the model as task 1 left it."""
    torch.manual_seed(0)
    model = CIGN(cfg, n_classes=2)
    method = CignMethod(model, cfg)
    method.task = Task(1, (0, 1), (2,))
    method.begin_task(method.task)
    model.grow(1)
    model.train()
    return method, method.observe(batch())


def grads(model: CIGN, loss: torch.Tensor) -> dict[str, float]:
    """Gradient norm of ``loss`` per top-level module of the model."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    out = {}
    for name, module in model.named_children():
        gs = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        out[name] = float(torch.stack(gs).norm()) if gs else 0.0
    out["tokens"] = 0.0 if model.tokens.grad is None else float(model.tokens.grad.norm())
    return out


def test_contextual_token_kl_is_non_zero_at_a_tasks_first_step_and_reaches_the_body():
    method, terms = first_step(TINY)
    # same weights as the teacher, but the new token joins the attention of eqs 1-2
    assert terms["kl"].item() > 1e-4
    g = grads(method.model, terms["kl"])
    assert all(g[m] > 0 for m in BODY), g
    assert g["head_a"] == g["head_v"] == 0.0  # eq 8's KL does not read the heads


def test_table_token_kl_is_exactly_zero_at_a_tasks_first_step():
    """The literal reading: grow() copies the table into the student, so the KL starts at 0."""
    _, terms = first_step(dataclasses.replace(TINY, token_source="table"))
    assert terms["kl"].item() == 0.0


def test_contextual_token_ce_reaches_the_body_and_the_table_ce_does_not():
    method, terms = first_step(TINY)
    g = grads(method.model, terms["ce"])
    assert all(g[m] > 0 for m in BODY) and g["token_cls"] > 0, g
    method, terms = first_step(dataclasses.replace(TINY, token_source="table"))
    g = grads(method.model, terms["ce"])
    assert all(g[m] == 0 for m in BODY) and g["token_cls"] > 0 and g["tokens"] > 0, g


def test_continual_grouping_reaches_grouping_and_body():
    method, terms = first_step(TINY)
    assert terms["ctl"].item() > 0
    g = grads(method.model, terms["ctl"])
    assert all(g[m] > 0 for m in BODY + ("group_a", "group_v")), g
    assert all(p.grad is None for p in method.teacher.parameters())  # the teacher is frozen


@pytest.mark.parametrize("teacher_bn, same", [("batch", True), ("running", False)])
def test_teacher_batchnorm(teacher_bn, same):
    """``batch``: with the student's weights (before grow) the teacher reproduces the training-mode
    student on the same batch, and its running statistics stay as they were; ``running`` does not."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, teacher_bn=teacher_bn)
    model = CIGN(cfg, n_classes=2)
    with torch.no_grad():  # running statistics away from their initial 0 / 1, as after a task
        model.train()(*batch()[:2])
    method = CignMethod(model, cfg)
    method.task = Task(1, (0, 1), (2,))
    method.begin_task(method.task)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items() if "running" in k}
    x = batch()
    with torch.no_grad():
        student = model.train()(x.spectrograms, x.frames)
        teacher = method.teacher_features(x)
    after = {k: v for k, v in method.teacher.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.allclose(teacher.g_v, student.g_v, atol=1e-5) == same
    assert torch.allclose(teacher.c_a, student.c_a, atol=1e-5) == same
    method.diagnose(x._replace(labels=torch.tensor([0, 1, 1, 0])))  # both in eval mode, then every module restored
    with torch.no_grad():
        assert torch.allclose(method.teacher_features(x).g_v, student.g_v, atol=1e-5) == same
    assert model.training


def test_shared_parameters_cover_the_body():
    """What the gradient-ratio diagnostics call the shared body is what these tests check."""
    model = CIGN(TINY, n_classes=2)
    ids = {id(p) for p in shared_parameters(model)}
    for name in BODY:
        assert all(id(p) in ids for p in getattr(model, name).parameters())
