"""PODNet: POD-spatial against hand-computed values (width and height pooled separately, one L2
normalisation per sample over every channel, summed over stages), POD-flat's cosine form, the adaptive
weight sqrt(N_seen / N_new), the stage maps the forward hooks read and their removal, and the method's
terms on a tiny real model: zero at the frozen copy, positive once the student has moved, the gradient
in both student encoders and never in the teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cign_train.losses import grouping_bce
from cign_train.methods import Inputs, Task, TaskData, get_method
from cign_train.methods.podnet import PODNet, adaptive_weight, pod_flat, pod_spatial, record, stages
from cign_train.model import CIGN
from cign_train.model.encoders import CNN8, CNN8_STAGES, ResNet18Trunk
from tiny import TINY, inputs

TASK_1 = Task(1, (0, 1, 2, 3), (4, 5))  # adaptive weight sqrt(6 / 2)

pytestmark = pytest.mark.usefixtures("one_thread")


def at_task(index: int, **options) -> PODNet:
    """A PODNet over a 4-class model at task ``index``: begin_task, then the trainer's grow (task 1: by 2)."""
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=4)
    method = PODNet(model, TINY, options)
    method.task = TASK_1 if index else Task(0, (), (0, 1, 2, 3))
    method.begin_task(method.task)
    if index:
        model.grow(2)
    return method


def hooks(module: nn.Module) -> int:
    """Forward hooks registered on ``module`` and its submodules."""
    return sum(len(m._forward_hooks) for m in module.modules())


def maps(*rows: list[list[list[float]]]) -> torch.Tensor:
    """One stage's maps from per-sample (C, H, W) nested lists -> (B, C, H, W)."""
    return torch.tensor(rows)


def test_defaults_are_the_papers():
    assert get_method("podnet") is PODNet and PODNet.NEEDS_BUFFER
    assert PODNet.resolve_options({}) == {"podnet_lambda_spatial": 3.0, "podnet_lambda_flat": 1.0}


def test_pod_spatial_matches_a_hand_computation():
    # stage 1, (B 2, C 1, H 2, W 3). Teacher sample 0: row sums (over w) [3, 2], column sums (over h) [1, 3, 1],
    # Phi = [3, 2, 1, 3, 1] / sqrt 24. Student: rows [3, 2], columns [1, 1, 3] -> [3, 2, 1, 1, 3] / sqrt 24;
    # distance |[0, 0, 0, 2, -2]| / sqrt 24 = 1 / sqrt 3. Sample 1: the student is twice the teacher, the same
    # after the per-sample normalisation: 0.
    t1 = maps([[[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]], [[[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]]])
    s1 = maps([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]], [[[2.0, 0.0, 4.0], [2.0, 2.0, 0.0]]])
    stage1 = 1 / math.sqrt(3) / 2
    assert pod_spatial([s1], [t1]).item() == pytest.approx(stage1, rel=1e-6)
    # stage 2, (B 2, C 2, H 1, W 2): one normalisation over both channels. Teacher sample 0: channel 0 [[3, 1]]
    # -> [4 | 3, 1], channel 1 [[1, 1]] -> [2 | 1, 1]: [4, 3, 1, 2, 1, 1] / sqrt 32. Student: channel 0 [[1, 3]]
    # -> [4, 1, 3, 2, 1, 1] / sqrt 32; distance |[0, 2, -2, 0, 0, 0]| / sqrt 32 = 1 / 2 (channel by channel
    # normalised it would be sqrt(8 / 26)). Sample 1 is the same in both: 0.
    t2 = maps([[[3.0, 1.0]], [[1.0, 1.0]]], [[[0.5, 2.0]], [[1.0, 0.0]]])
    s2 = maps([[[1.0, 3.0]], [[1.0, 1.0]]], [[[0.5, 2.0]], [[1.0, 0.0]]])
    assert pod_spatial([s2], [t2]).item() == pytest.approx(0.25, rel=1e-6)
    assert pod_spatial([s1, s2], [t1, t2]).item() == pytest.approx(stage1 + 0.25, rel=1e-6)  # summed over stages


def test_pod_spatial_pools_over_width_and_height_separately():
    # mirrored along the width: the row sums stay [1, 0], the column sums go [1, 0, 0] -> [0, 0, 1]: Phi
    # [1, 0, 1, 0, 0] / sqrt 2 against [1, 0, 0, 0, 1] / sqrt 2, distance 1. Pooled over both at once
    # (one value per channel) the two maps would be the same: 0.
    t = maps([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    assert pod_spatial([t.flip(-1)], [t]).item() == pytest.approx(1.0, rel=1e-6)
    # mirrored along the height: the row sums [1, 0] -> [0, 1], the columns unchanged; distance 1 as well
    assert pod_spatial([t.flip(-2)], [t]).item() == pytest.approx(1.0, rel=1e-6)
    # pooled, not pixel by pixel: every pixel differs, but the row and column sums are those of the teacher
    diagonal = maps([[[1.0, 0.0], [0.0, 1.0]]])
    assert pod_spatial([diagonal.flip(-1)], [diagonal]).item() == pytest.approx(0.0, abs=1e-7)


def test_pod_is_zero_with_a_finite_zero_gradient_when_the_student_equals_the_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.rand(shape, generator=g).requires_grad_() for shape in ((3, 4, 5, 6), (3, 8, 2, 3))]
    student = [t.detach().clone().requires_grad_() for t in teacher]
    loss = pod_spatial(student, teacher)
    assert loss.item() == 0.0
    loss.backward()  # the distance's gradient at 0 is 0, not NaN
    for s, t in zip(student, teacher):
        assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
        assert t.grad is None  # the teacher's maps are targets
    f = torch.randn(3, 16, generator=g)
    student_f = f.clone().requires_grad_()
    flat = pod_flat(student_f, f)
    assert flat.item() == pytest.approx(0.0, abs=1e-6)
    flat.backward()
    torch.testing.assert_close(student_f.grad, torch.zeros_like(f), atol=1e-6, rtol=0)


def test_pod_flat_is_one_minus_the_cosine_and_only_the_student_gets_a_gradient():
    # cos([3, 4], [4, 3]) = 24 / 25; cos([1, 0], [0, 2]) = 0: mean of 1 - cos = (0.04 + 1) / 2
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]], requires_grad=True)
    loss = pod_flat(student, teacher)
    assert loss.item() == pytest.approx(0.52, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and (student.grad != 0).any()
    assert pod_flat(5 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)  # the scale does not count


def test_adaptive_weight_is_the_root_of_seen_over_new_classes():
    assert adaptive_weight(TASK_1) == pytest.approx(math.sqrt(3))  # 6 seen, 2 new (old / new would be sqrt 2)
    assert adaptive_weight(Task(9, tuple(range(90)), tuple(range(90, 100)))) == pytest.approx(math.sqrt(10))
    assert adaptive_weight(Task(1, (0,), (1,))) == pytest.approx(math.sqrt(2))


def test_stages_are_each_stages_last_layer():
    cnn = CNN8(1, first_stride=2)
    picked = stages(cnn)
    assert picked == [cnn[1], cnn[4], cnn[7], cnn[10]]  # before each max pool, and the last layer
    assert [m[0].out_channels for m in picked] == list(CNN8_STAGES)
    resnet = ResNet18Trunk(1)
    assert stages(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    with pytest.raises(TypeError, match="Identity"):
        stages(nn.Identity())


def test_record_reads_the_stage_maps_and_embeddings_and_removes_its_hooks():
    model = at_task(0).model.eval()
    x = inputs(0, [0, 1])
    with torch.no_grad():
        out, got = record(model, lambda: model(x.spectrograms, x.frames))
        ref = model(x.spectrograms, x.frames)
        f_a, f_v = model.audio_encoder(x.spectrograms), model.visual_encoder(x.frames)
        expected_a, expected_v = [], []
        h_a, h_v = x.spectrograms.unsqueeze(1), x.frames
        for i, (layer_a, layer_v) in enumerate(zip(model.audio_encoder.backbone, model.visual_encoder.backbone)):
            h_a, h_v = layer_a(h_a), layer_v(h_v)
            if i in (1, 4, 7, 10):
                expected_a.append(h_a)
                expected_v.append(h_v)
    assert hooks(model) == 0
    torch.testing.assert_close(out.logits_a, ref.logits_a)  # the hooks change nothing
    # audio (32 x 40, first stride 2): 16 x 20, 8 x 10, 4 x 5, 2 x 3; visual 64 x 64: 64, 32, 16, 8
    assert [tuple(m.shape) for m in got.maps_a] == [(2, 32, 16, 20), (2, 64, 8, 10), (2, 128, 4, 5), (2, 256, 2, 3)]
    assert [tuple(m.shape) for m in got.maps_v] == [(2, 32, 64, 64), (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]
    for g, e in zip(got.maps_a + got.maps_v, expected_a + expected_v):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(got.f_a, f_a)
    torch.testing.assert_close(got.f_v, f_v.mean(dim=1))
    with pytest.raises(RuntimeError):  # 4-channel frames: the visual stem fails mid-pass
        record(model, lambda: model(x.spectrograms, torch.zeros(2, 4, 64, 64)))
    assert hooks(model) == 0


def test_first_task_is_fine_tuning():
    method = at_task(0)
    assert method.teacher is None
    x = inputs(0, [0, 1, 2, 3])
    terms = method.observe(x)
    out = method.model(x.spectrograms, x.frames)
    assert terms["pod_spatial"].item() == 0.0 and terms["pod_flat"].item() == 0.0
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, x.labels).item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item(), rel=1e-6)


def test_the_teacher_is_the_frozen_model_before_it_grew():
    method = at_task(1)
    teacher = method.teacher
    assert teacher is not method.model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.n_classes == 4 and method.model.n_classes == 6


def student_maps(model: CIGN, x: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """cnn8's stage maps by running its layers one by one (no hooks), audio then visual."""
    out = ([], [])
    for m, (backbone, h) in enumerate(((model.audio_encoder.backbone, x.spectrograms.unsqueeze(1)),
                                       (model.visual_encoder.backbone, x.frames))):
        for i, layer in enumerate(backbone):
            h = layer(h)
            if i in (1, 4, 7, 10):
                out[m].append(h)
    return out


def test_a_step_at_task_2_moves_the_student_and_gives_the_weighted_pod_of_its_maps():
    method = at_task(1, podnet_lambda_spatial=2.0, podnet_lambda_flat=0.5)
    model, teacher = method.model, method.teacher
    x = inputs(1, [4, 5, 0, 2])
    model.eval()  # the same BatchNorm statistics as the teacher: the copy has not moved
    terms = method.observe(x)
    assert terms["pod_spatial"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["pod_flat"].item() == pytest.approx(0.0, abs=1e-6)

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    method.observe(x)["total"].backward()
    optimizer.step()
    model.eval()
    terms = method.observe(x)
    assert hooks(model) == 0 and hooks(teacher) == 0
    with torch.no_grad():
        (s_a, s_v), (t_a, t_v) = student_maps(model, x), student_maps(teacher, x)
        spatial = math.sqrt(3) * 2.0 * (pod_spatial(s_a, t_a) / 4 + pod_spatial(s_v, t_v) / 4)
        flat = math.sqrt(3) * 0.5 * (
            pod_flat(model.audio_encoder(x.spectrograms), teacher.audio_encoder(x.spectrograms))
            + pod_flat(model.visual_encoder(x.frames).mean(dim=1), teacher.visual_encoder(x.frames).mean(dim=1)))
    assert terms["pod_spatial"].item() > 1e-3 and terms["pod_flat"].item() > 1e-4
    assert terms["pod_spatial"].item() == pytest.approx(spatial.item(), rel=1e-4)
    assert terms["pod_flat"].item() == pytest.approx(flat.item(), rel=1e-4)
    assert terms["total"].item() == pytest.approx(
        terms["bce"].item() + terms["ce"].item() + terms["pod_spatial"].item() + terms["pod_flat"].item(), rel=1e-6)


def test_the_gradient_reaches_every_stage_of_both_student_encoders_and_never_the_teacher():
    method = at_task(1)
    model, teacher = method.model, method.teacher
    before = [p.clone() for p in teacher.parameters()]
    terms = method.observe(inputs(2, [4, 5, 1, 3]))  # train mode: batch statistics, unlike the teacher's
    assert terms["pod_spatial"].item() > 0
    terms["pod_spatial"].backward(retain_graph=True)
    for encoder in (model.audio_encoder, model.visual_encoder):
        for stage in stages(encoder.backbone):
            assert stage[0].weight.grad is not None and stage[0].weight.grad.abs().sum() > 0
        assert encoder.proj.weight.grad is None  # POD-spatial reads the maps before the projection
    model.zero_grad(set_to_none=True)
    terms["pod_flat"].backward()
    for encoder in (model.audio_encoder, model.visual_encoder):
        assert encoder.proj.weight.grad is not None and encoder.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    for p, q in zip(teacher.parameters(), before):
        torch.testing.assert_close(p, q)


def test_no_hook_is_left_after_a_step_a_failed_step_or_end_task():
    method = at_task(1)
    model, teacher = method.model, method.teacher
    method.observe(inputs(3, [4, 5]))
    assert hooks(model) == 0 and hooks(teacher) == 0
    with pytest.raises(RuntimeError):
        method.observe(inputs(3, [4, 5], channels=4))  # fails inside the student's forward pass
    assert hooks(model) == 0 and hooks(teacher) == 0
    method.end_task(method.task, TaskData(lambda: iter(()), lambda: iter(())))
    assert method.teacher is None and hooks(model) == 0
