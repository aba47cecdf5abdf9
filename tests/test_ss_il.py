"""SS-IL: the separated softmax against a hand-computed value and its group separation, task-wise KD
against a hand-computed value (zero for a student equal to its teacher), the loss of a real step, and
the task boundaries a resume carries."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cign_train.losses import token_independence
from cign_train.methods import Inputs, Task, TaskData
from cign_train.methods.ss_il import SSIL, separated_softmax, task_distillation
from cign_train.model import CIGN
from tiny import TINY

NO_DATA = TaskData(lambda: iter(()), lambda: iter(()))


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(labels: list[int], seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return Inputs(torch.randn(n, 32, 40, generator=g), torch.randn(n, 3, 64, 64, generator=g), torch.tensor(labels))


LOGITS = [[1.0, 2.0, 0.5, -1.0],  # an old-class sample (label 1)
          [0.0, 3.0, 1.0, 2.5],  # a new-class sample (label 3)
          [2.0, -1.0, 0.0, 1.5]]  # a new-class sample (label 2)


def test_separated_softmax_is_each_groups_cross_entropy_by_hand():
    loss = separated_softmax(torch.tensor(LOGITS), torch.tensor([1, 3, 2]), (2, 3))
    # -log softmax over the own group only: (1, 2) at 2, (1, 2.5) at 2.5, (0, 1.5) at 0
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(1.5))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_separated_softmax_ignores_the_other_groups_logits():
    logits = torch.tensor(LOGITS, requires_grad=True)
    labels = torch.tensor([1, 3, 2])
    separated_softmax(logits, labels, (2, 3)).backward()
    assert torch.all(logits.grad[0, 2:] == 0) and torch.all(logits.grad[1:, :2] == 0)
    assert torch.all(logits.grad[0, :2] != 0) and torch.all(logits.grad[1:, 2:] != 0)
    moved = torch.tensor(LOGITS)
    moved[0, 2:] += torch.tensor([7.0, -3.0])  # the old sample's new-class logits
    moved[1:, :2] -= 5.0  # the new samples' old-class logits
    unmoved = separated_softmax(torch.tensor(LOGITS), labels, (2, 3))
    assert separated_softmax(moved, labels, (2, 3)).item() == unmoved.item()


def test_separated_softmax_of_the_first_task_is_the_plain_cross_entropy():
    logits, labels = torch.tensor(LOGITS), torch.tensor([1, 3, 2])
    plain = F.cross_entropy(logits, labels)
    assert separated_softmax(logits, labels, (0, 1, 2, 3)).item() == pytest.approx(plain.item())


def test_task_distillation_by_hand_and_per_task():
    e = math.e
    student = torch.tensor([[0.0, 2.0, 1.0, -1.0, 5.0], [1.0, 1.0, 0.0, 2.0, -4.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 2.0]])
    # sample 0 at T = 2: task (0, 1) softmaxes (1/2, 1/2) || (1, e) / (1 + e); task (2, 3) (1, e) / (1 + e) ||
    # (e, 1) / (1 + e); sample 1 equals its teacher: 0. Batch mean, times T^2.
    kl = math.log((1 + e) / 2) - 0.5 + (e - 1) / (e + 1)
    loss = task_distillation(student, teacher, ((0, 1), (2, 3)), 2.0)
    assert loss.item() == pytest.approx(4 * kl / 2, rel=1e-6)
    student[:, 4] = 0.0  # the new class's logit plays no part
    assert task_distillation(student, teacher, ((0, 1), (2, 3)), 2.0).item() == pytest.approx(loss.item(), rel=1e-7)
    student[0, :2] += 3.0  # nor does a shift within one task (each task has its own softmax)
    assert task_distillation(student, teacher, ((0, 1), (2, 3)), 2.0).item() == pytest.approx(loss.item(), rel=1e-6)


def test_task_distillation_is_zero_for_a_student_equal_to_its_teacher():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=4).eval()
    method = SSIL(model, TINY, {})
    method.load_state_dict({"task_classes": [[0, 1], [2, 3]]})
    method.begin_task(Task(2, (0, 1, 2, 3), (4,)))
    x = inputs([0, 1, 2, 3])
    with torch.no_grad():
        out, old = model(x.spectrograms, x.frames), method.teacher(x.spectrograms, x.frames)
    for s, t in ((out.logits_a, old.logits_a), (out.logits_v, old.logits_v)):
        assert task_distillation(s, t, method.task_classes, 2.0).item() == 0.0


def test_a_step_is_ss_plus_weighted_tkd_plus_token_ce_with_a_frozen_previous_model():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=2)
    method = SSIL(model, TINY, {"ss_il_temperature": 3.0, "ss_il_tkd_weight": 0.5})
    first = Task(0, (), (0, 1))
    method.task = first
    method.begin_task(first)
    assert method.teacher is None
    model.eval()
    x = inputs([0, 1, 1, 0])
    terms = method.observe(x)
    out = model(x.spectrograms, x.frames)
    assert terms["tkd"].item() == 0.0
    assert terms["ss"].item() == pytest.approx((F.cross_entropy(out.logits_a, x.labels)
                                                + F.cross_entropy(out.logits_v, x.labels)).item(), rel=1e-5)
    method.end_task(first, NO_DATA)

    second = Task(1, (0, 1), (2, 3))
    method.task = second
    method.begin_task(second)
    teacher = method.teacher
    assert teacher is not None and not teacher.training and teacher.n_classes == 2
    assert not any(p.requires_grad for p in teacher.parameters())
    model.grow(2)
    with torch.no_grad():
        model.head_a.weight.mul_(1.5)  # the student moves away from the teacher
    x = inputs([0, 3, 2, 1, 2], seed=1)
    terms = method.observe(x)
    out = model(x.spectrograms, x.frames)
    with torch.no_grad():
        old = teacher(x.spectrograms, x.frames)
    ss, tkd = 0.0, 0.0
    for s, t in ((out.logits_a, old.logits_a), (out.logits_v, old.logits_v)):
        ss += (F.cross_entropy(s[[0, 3], :2], x.labels[[0, 3]], reduction="sum")
               + F.cross_entropy(s[[1, 2, 4], 2:], x.labels[[1, 2, 4]] - 2, reduction="sum")) / 5
        tkd += F.kl_div(F.log_softmax(s[:, :2] / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    ce = token_independence(model.token_logits(), (2, 3))
    assert terms["ss"].item() == pytest.approx(ss.item(), rel=1e-5)
    # the KL is a small difference of O(1) log-probabilities, so its float32 roundoff is absolute (3e-7
    # between the two formulas on an AMD EPYC's kernels): a wrong T^2, temperature or class set moves it by far more
    assert terms["tkd"].item() == pytest.approx(tkd.item(), rel=1e-5, abs=1e-6) and terms["tkd"].item() > 0
    assert terms["total"].item() == pytest.approx((ss + 0.5 * tkd + ce).item(), rel=1e-5)
    terms["total"].backward()
    assert model.head_a.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    method.end_task(second, NO_DATA)
    assert method.teacher is None and method.task_classes == ((0, 1), (2, 3))


def test_state_dict_carries_the_task_boundaries_to_a_resume():
    model = CIGN(TINY, n_classes=2)
    method = SSIL(model, TINY, {})
    for task in (Task(0, (), (0, 1)), Task(1, (0, 1), (2,))):
        method.begin_task(task)
        method.end_task(task, NO_DATA)
    fresh = SSIL(model, TINY, {})
    with pytest.raises(RuntimeError, match="resume without the method state"):
        fresh.begin_task(Task(2, (0, 1, 2), (3,)))
    fresh.load_state_dict(method.state_dict())
    assert fresh.task_classes == ((0, 1), (2,))
    fresh.begin_task(Task(2, (0, 1, 2), (3,)))
    assert fresh.teacher is not None


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(ValueError, match="has no option"):
        SSIL(CIGN(TINY, 2), TINY, {"temperature": 2.0})
    with pytest.raises(ValueError, match="ss_il_temperature"):
        SSIL(CIGN(TINY, 2), TINY, {"ss_il_temperature": "warm"})
