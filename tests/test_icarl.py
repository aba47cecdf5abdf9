"""iCaRL: Algorithm 3's loss against hand-computed values (its old-class targets are the previous
model's sigmoids), the class means of the exemplars' normalised features, the nearest-mean classifier
(Algorithm 1) on features whose answer is known, and the class means a resume or rescore restores."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from cign_train.losses import grouping_bce
from cign_train.methods import Inputs, Task, TaskData, get_method
from cign_train.methods.icarl import ICaRL, icarl_bce, nme_probabilities
from cign_train.model import CIGN
from tiny import TINY, inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def method_for(n_classes: int, task: Task) -> ICaRL:
    torch.manual_seed(0)
    method = ICaRL(CIGN(TINY, n_classes=n_classes), TINY, {})
    method.task = task
    return method


def with_exemplars(method: ICaRL, exemplars: list[Inputs]) -> ICaRL:
    method.end_task(method.task, TaskData(lambda: iter(()), lambda: iter(exemplars)))
    return method


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_icarl_needs_the_buffer():
    assert get_method("icarl") is ICaRL and ICaRL.NEEDS_BUFFER


def test_loss_matches_a_hand_computation():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])  # K = 3, class 2 is new
    old = torch.tensor([[0.0, 1.0], [2.0, -1.0]])  # the previous model's logits, C = 2
    labels = torch.tensor([2, 0])  # a new-class clip and an exemplar of old class 0

    def bce(z: float, y: float) -> float:
        return -(y * math.log(sigmoid(z)) + (1 - y) * math.log(1 - sigmoid(z)))

    new = (bce(0.5, 1) + bce(-1.0, 0)) / 2  # the exemplar's new-class target is 0
    # old classes: the targets are sigmoid(old logits), also for the exemplar's own class (not 1)
    kd = (bce(1.0, 0.5) + bce(-2.0, sigmoid(1.0)) + bce(0.0, sigmoid(2.0)) + bce(3.0, sigmoid(-1.0))) / 2
    got_new, got_kd = icarl_bce(logits, labels, old)
    assert got_new.item() == pytest.approx(new, rel=1e-6)
    assert got_kd.item() == pytest.approx(kd, rel=1e-6)


def test_distillation_targets_are_the_previous_models_sigmoids():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    old = torch.randn(4, 3, generator=g, requires_grad=True)
    _, kd = icarl_bce(logits, torch.tensor([3, 4, 0, 1]), old)
    kd.backward()
    assert old.grad is None  # the previous model gets no gradient
    # d BCE(z, q) / d z = sigmoid(z) - q: zero exactly where the student's sigmoid is the teacher's
    torch.testing.assert_close(logits.grad[:, :3], (logits[:, :3].sigmoid() - old.sigmoid()).detach() / 4)
    assert (logits.grad[:, 3:] == 0).all()  # new classes are not distilled


def test_first_task_is_eq_8s_bce_and_a_later_task_distils_the_frozen_previous_model():
    first = method_for(2, Task(0, (), (0, 1)))
    first.begin_task(first.task)
    assert first.teacher is None
    x = inputs(0, [0, 1, 1, 0])
    terms = first.observe(x)
    out = first.model(x.spectrograms, x.frames)
    assert terms["distill"].item() == 0.0
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, x.labels).item(), rel=1e-5)

    method = method_for(2, Task(1, (0, 1), (2,)))
    method.begin_task(method.task)
    method.model.grow(1)
    teacher = method.teacher
    assert teacher.n_classes == 2 and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    method.model.eval()  # the teacher's BatchNorm statistics too
    x = inputs(1, [2, 0, 2, 1])
    terms = method.observe(x)
    with torch.no_grad():
        s, t = method.model(x.spectrograms, x.frames), teacher(x.spectrograms, x.frames)
    y = F.one_hot(x.labels, 3).float()
    kd = sum(F.binary_cross_entropy_with_logits(z[:, :2], q.sigmoid(), reduction="sum") / 4
             for z, q in ((s.logits_a, t.logits_a), (s.logits_v, t.logits_v)))
    bce = sum(F.binary_cross_entropy_with_logits(z[:, 2:], y[:, 2:], reduction="sum") / 4
              for z in (s.logits_a, s.logits_v))
    assert terms["distill"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["bce"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["distill"].item() + terms["ce"].item(),
                                                  rel=1e-6)


def test_nme_picks_the_nearest_class_mean_whatever_the_temperature():
    means = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1)
    phi = F.normalize(torch.tensor([[0.9, 0.2], [0.1, 0.8], [-0.5, -0.6], [0.6, 0.5]]), dim=1)
    # [0.6, 0.5] / |.| = [0.768, 0.640]: nearer [1, 0] than [0, 1]
    for tau in (0.05, 0.1, 1.0):
        p = nme_probabilities(phi, means, tau)
        assert p.argmax(dim=1).tolist() == [0, 1, 2, 0]
        torch.testing.assert_close(p.sum(dim=1), torch.ones(4))
    assert (p > 0).all() and (p < 1).all()
    # row 0 at tau 0.5: softmax of the cosines [0.9, 0.2, -1.1 / sqrt 2] / |[0.9, 0.2]|, over 0.5
    n = math.hypot(0.9, 0.2)
    cos = [0.9 / n, 0.2 / n, -1.1 / n / math.sqrt(2)]
    e = [math.exp(c / 0.5) for c in cos]
    assert nme_probabilities(phi, means, 0.5)[0].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-5)


def given(audio: list[list[float]], visual: list[list[list[float]]], labels: list[int]) -> Inputs:
    """A batch whose encoder features are given (``hand_made``): audio (B, 2), visual (B, P, 2), padded to D."""
    return Inputs(F.pad(torch.tensor(audio), (0, TINY.dim - 2)), F.pad(torch.tensor(visual), (0, TINY.dim - 2)),
                  torch.tensor(labels))


def hand_made(n_classes: int) -> ICaRL:
    """An ICaRL whose encoders return their input: its features are known by hand."""
    method = method_for(n_classes, Task(0, (), tuple(range(n_classes))))
    method.model.audio_encoder = torch.nn.Identity()
    method.model.visual_encoder = torch.nn.Identity()
    return method


def test_class_means_average_the_normalised_features_and_renormalise():
    # class 0: audio [3, 0] and [0, 1] normalise to [1, 0] and [0, 1], mean [.5, .5] -> [1, 1] / sqrt 2
    # (the raw mean [1.5, .5] would point elsewhere); visual: each clip first averages its 2 patches.
    exemplars = [given([[3.0, 0.0], [0.0, 4.0]], [[[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 3.0]]], [0, 1]),
                 given([[0.0, 1.0]], [[[4.0, 0.0], [4.0, 0.0]]], [0])]
    method = with_exemplars(hand_made(2), exemplars)
    r = 1 / math.sqrt(2)
    # visual class 0: [1, 1] / sqrt 2 and [1, 0] -> mean [(1 + r) / 2, r / 2], renormalised
    v0 = torch.tensor([1 + r, r]) / math.hypot(1 + r, r)
    expected = torch.tensor([[[r, r], [0.0, 1.0]], [v0.tolist(), [0.0, 1.0]]])  # (modality, class, 2)
    torch.testing.assert_close(method.means[..., :2], expected)
    assert (method.means[..., 2:] == 0).all()


def test_predict_scores_the_nearest_mean_per_modality_and_p_av_the_nearest_in_both():
    # class means (one exemplar each): audio [1, 0], [0, 1]; visual [1, 0], [0, 1]
    exemplars = [given([[1.0, 0.0], [0.0, 1.0]], [[[1.0, 0.0]], [[0.0, 1.0]]], [0, 1])]
    method = with_exemplars(hand_made(2), exemplars)
    # clip 0: audio nearer class 0 (cos .742 vs .671), visual at class 1's mean (cos 0 vs 1); the summed cosines
    # (d_a^2 + d_v^2 = 4 - 2 cos_a - 2 cos_v) favour class 1
    s, c = math.sin(math.pi / 4 - 0.05), math.cos(math.pi / 4 - 0.05)
    query = given([[c, s], [0.0, 2.0]], [[[0.0, 1.0]], [[3.0, 0.1]]], [0, 1])
    p = method.predict(query)
    assert p.p_a.argmax(dim=1).tolist() == [0, 1]
    assert p.p_v.argmax(dim=1).tolist() == [1, 0]
    assert p.p_av.argmax(dim=1).tolist() == [1, 1]  # clip 1: cos sums 0 + .999 (class 0) and 1 + .033 (class 1)
    torch.testing.assert_close(p.p_av, p.p_a * p.p_v)
    # default tau 0.1: p_a of clip 0 is softmax([c, s] / 0.1)
    e0, e1 = math.exp(c / 0.1), math.exp(s / 0.1)
    assert p.p_a[0].tolist() == pytest.approx([e0 / (e0 + e1), e1 / (e0 + e1)], rel=1e-5)


def test_class_means_of_the_real_encoders_are_computed_in_eval_mode():
    exemplars = [inputs(0, [0, 1, 0]), inputs(1, [2, 1, 2, 0])]
    method = with_exemplars(method_for(3, Task(0, (), (0, 1, 2))), exemplars)
    assert method.model.training  # the mode end_task found
    model = method.model.eval()
    sums = torch.zeros(2, 3, TINY.dim)
    with torch.no_grad():
        for x in exemplars:
            f_a = F.normalize(model.audio_encoder(x.spectrograms), dim=1)
            f_v = F.normalize(model.visual_encoder(x.frames).mean(dim=1), dim=1)
            for i, k in enumerate(x.labels.tolist()):
                sums[0, k] += f_a[i]
                sums[1, k] += f_v[i]
    torch.testing.assert_close(method.means, F.normalize(sums, dim=-1), rtol=1e-5, atol=1e-6)


def test_a_class_without_exemplars_is_refused():
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        with_exemplars(method_for(4, Task(0, (), (0, 1, 2, 3))), [inputs(0, [0, 1, 2])])


def test_state_dict_restores_the_class_means():
    x = inputs(0, [0, 1, 2, 0, 1])
    method = with_exemplars(method_for(3, Task(0, (), (0, 1, 2))), [x])
    method.model.eval()
    fresh = ICaRL(method.model, TINY, {})
    with pytest.raises(RuntimeError, match="class means"):
        fresh.predict(x)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)  # as a task checkpoint keeps it
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.means, method.means)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x).p_av, method.predict(x).p_av)
