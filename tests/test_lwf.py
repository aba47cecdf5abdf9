"""LwF: its distillation term against hand-computed values (a cross-entropy: the softened teacher's
entropy, not 0, at student == teacher), its gradient (the student's old classes only, never the
teacher), and how the method adds it to fine-tuning's loss with a frozen copy of the previous model."""
from __future__ import annotations

import math

import pytest
import torch

from cign_train.losses import grouping_bce, token_independence
from cign_train.methods import TaskData, get_method
from cign_train.methods.lwf import LwF, distillation
from tiny import at_task, inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_papers():
    assert get_method("lwf") is LwF and not LwF.NEEDS_BUFFER
    assert LwF.resolve_options({}) == {"lwf_lambda": 1.0, "lwf_temperature": 2.0}


def test_distillation_matches_a_hand_computation_over_the_old_classes_only():
    student = torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, -3.0]])  # K = 3: the last class is new
    teacher = torch.tensor([[0.0, 2.0], [4.0, 4.0]])  # C = 2
    # T = 2. Row 0: y' = softmax([0, 1]) = [1, e] / (1 + e), log y_hat' = log softmax([1, 0]) = [1, 0] - log(1 + e).
    e = math.e
    row0 = -(1 / (1 + e) * (1 - math.log(1 + e)) + e / (1 + e) * -math.log(1 + e))
    # Row 1: y' = [1/2, 1/2], log y_hat' = [-log 2, -log 2].
    row1 = math.log(2)
    assert distillation(student, teacher, 2.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # T = 1 on row 0: softmax([0, 2]) against log softmax([2, 0]).
    p = 1 / (1 + math.exp(2))
    row0_t1 = -(p * (2 - math.log(1 + math.exp(2))) + (1 - p) * -math.log(1 + math.exp(2)))
    assert distillation(student[:1], teacher[:1], 1.0).item() == pytest.approx(row0_t1, rel=1e-6)


def test_at_student_equal_teacher_it_is_the_softened_entropy_and_its_gradient_vanishes():
    teacher = torch.tensor([[1.0, -1.0, 0.5]])
    student = torch.tensor([[1.0, -1.0, 0.5, 3.0]], requires_grad=True)  # the old logits equal, one new class
    loss = distillation(student, teacher, 2.0)
    y = torch.softmax(teacher / 2, dim=1)
    assert loss.item() == pytest.approx(-(y * y.log()).sum().item(), rel=1e-6) and loss.item() > 0.5
    loss.backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student.grad), atol=1e-7, rtol=0)


def test_gradient_reaches_the_students_old_classes_only_and_never_the_teacher():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, generator=g, requires_grad=True)
    teacher = torch.randn(3, 3, generator=g, requires_grad=True)
    distillation(student, teacher, 2.0).backward()
    assert teacher.grad is None
    # d L / d z_i = (softmax(z / T)_i - y'_i) / (T B) on the old classes, 0 on the new ones
    expected = (torch.softmax(student[:, :3] / 2, dim=1) - torch.softmax(teacher / 2, dim=1)).detach() / (2 * 3)
    torch.testing.assert_close(student.grad[:, :3], expected)
    assert (student.grad[:, :3] != 0).all() and (student.grad[:, 3:] == 0).all()


def test_first_task_is_fine_tuning():
    method = at_task(LwF, 0)
    assert method.teacher is None
    x = inputs(0, [0, 1, 1, 0])
    terms = method.observe(x)
    out = method.model(x.spectrograms, x.frames)
    assert terms["lwf"].item() == 0.0
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, x.labels).item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item(), rel=1e-6)


def test_observe_adds_lambda_times_both_modalities_distillation_from_the_frozen_previous_model():
    method = at_task(LwF, 1, lwf_lambda=0.5, lwf_temperature=3.0)
    teacher = method.teacher
    assert teacher is not method.model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.n_classes == 2 and method.model.n_classes == 3  # frozen before the model grew
    method.model.eval()  # the teacher's BatchNorm statistics too
    x = inputs(1, [2, 2, 2, 2])
    terms = method.observe(x)
    with torch.no_grad():
        s, t = method.model(x.spectrograms, x.frames), teacher(x.spectrograms, x.frames)
    expected = 0.5 * (distillation(s.logits_a, t.logits_a, 3.0) + distillation(s.logits_v, t.logits_v, 3.0))
    assert terms["lwf"].item() == pytest.approx(expected.item(), rel=1e-5) and terms["lwf"].item() > 0
    ce = token_independence(method.model.token_logits(), (2,))
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item() + terms["lwf"].item(),
                                                  rel=1e-6)

    terms["lwf"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for encoder in (method.model.audio_encoder, method.model.visual_encoder):  # the student's, both modalities
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_the_teacher_is_a_copy_that_training_does_not_move_and_end_task_drops_it():
    method = at_task(LwF, 1)
    bias = method.teacher.head_a.bias.clone()
    with torch.no_grad():
        method.model.head_a.bias += 1.0
    torch.testing.assert_close(method.teacher.head_a.bias, bias)
    method.end_task(method.task, TaskData(lambda: iter(()), lambda: iter(())))
    assert method.teacher is None
