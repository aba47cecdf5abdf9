"""IL2M: Eq. 1's rectification against hand-computed scores (only where the top-1 class is new), the
dual memory's statistics against a hand computation on a tiny real model, and the state a resume
(or a rescore) carries."""
from __future__ import annotations

import pytest
import torch

from cign_train.methods import Inputs, Task, TaskData
from cign_train.methods.il2m import IL2M
from cign_train.model import CIGN, predict
from tiny import TINY, GivenLogits


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(labels: list[int], seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return Inputs(torch.randn(n, 32, 40, generator=g), torch.randn(n, 3, 64, 64, generator=g), torch.tensor(labels))


def data(clips: list[Inputs], exemplars: list[Inputs]) -> TaskData:
    return TaskData(lambda: iter(clips), lambda: iter(exemplars))


def logit(p: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return (p / (1 - p)).log().float()


def test_rectification_by_hand_only_where_the_top_class_is_new():
    method = IL2M(GivenLogits(), TINY)
    # classes 0, 1 learned in state 0, class 2 in state 1 (the current one); rows audio, visual
    method.load_state_dict({
        "state": torch.tensor([0, 0, 1]),
        "initial": torch.tensor([[0.8, 0.6, 0.9], [0.5, 0.7, 0.6]]),
        "current": torch.tensor([[0.4, 0.2, 0.9], [0.25, 0.7, 0.6]]),
        "confidence": torch.tensor([[0.9, 0.6], [0.8, 0.4]]),
    })
    # mu^P / mu^N * conf(M_1) / conf(M_0): audio 2 * 2/3, 3 * 2/3; visual 2 * 1/2, 1 * 1/2; new class 1
    factors = [[4 / 3, 2.0, 1.0], [1.0, 0.5, 1.0]]
    torch.testing.assert_close(method.rectification(), torch.tensor(factors))
    p_a = [[0.5, 0.2, 0.6], [0.7, 0.1, 0.6]]  # top-1: new (rectified), old (left alone)
    p_v = [[0.3, 0.2, 0.1], [0.4, 0.6, 0.7]]  # top-1: old (left alone), new (rectified)
    out = method.predict(Inputs(logit(p_a), logit(p_v), torch.tensor([0, 0])))
    want_a = [[0.5 * 4 / 3, 0.2 * 2.0, 0.6], [0.7, 0.1, 0.6]]
    want_v = [[0.3, 0.2, 0.1], [0.4, 0.6 * 0.5, 0.7]]
    torch.testing.assert_close(out.p_a, torch.tensor(want_a))
    torch.testing.assert_close(out.p_v, torch.tensor(want_v))
    torch.testing.assert_close(out.p_av, torch.tensor(want_a) * torch.tensor(want_v))
    assert out.p_a[0].argmax() == 0  # the rectified old class now wins


def test_first_task_predictions_are_the_heads():
    method = IL2M(GivenLogits(), TINY)
    method.load_state_dict({"state": torch.tensor([0, 0]), "initial": torch.ones(2, 2), "current": torch.ones(2, 2),
                            "confidence": torch.ones(2, 1)})
    x = Inputs(logit([[0.2, 0.9]]), logit([[0.6, 0.3]]), torch.tensor([0]))
    for got, want in zip(method.predict(x), predict(GivenLogits()(x.spectrograms, x.frames))):
        torch.testing.assert_close(got, want)


@torch.no_grad()
def scores(model: CIGN, batches: list[Inputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's sigmoid scores (2, N, K), rows audio and visual, in eval mode, and the labels (N,)."""
    model.eval()
    outs = [model(b.spectrograms, b.frames) for b in batches]
    p = torch.stack([torch.cat([o.logits_a for o in outs]), torch.cat([o.logits_v for o in outs])]).sigmoid()
    return p, torch.cat([b.labels for b in batches])


def test_statistics_match_a_hand_computation_and_rectify_a_real_model():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=2)
    method = IL2M(model, TINY)
    clips0 = [inputs([0, 1, 0, 1], 0), inputs([1, 0, 0], 1)]
    method.end_task(Task(0, (), (0, 1)), data(clips0, []))
    assert model.training  # the statistics pass (in eval mode) leaves the mode as it found it
    p, y = scores(model, clips0)
    mu0 = torch.stack([p[:, y == c, c].mean(dim=1) for c in (0, 1)], dim=1)  # (2, 2)
    conf0 = p.amax(dim=2).mean(dim=1)  # (2,)
    torch.testing.assert_close(method.stats["initial"], mu0)
    torch.testing.assert_close(method.stats["confidence"], conf0[:, None])
    assert method.stats["state"].tolist() == [0, 0]

    model.grow(1)
    with torch.no_grad():  # the second task moves the weights
        for prm in model.parameters():
            prm.mul_(1.1)
    clips1 = [inputs([2, 2, 2], 2), inputs([2, 2], 3)]
    exemplars = [inputs([0, 2, 1, 0], 4), inputs([1, 2, 1], 5)]  # the buffer holds the new class too
    method.end_task(Task(1, (0, 1), (2,)), data(clips1, exemplars))
    p, y = scores(model, clips1)
    mu2, conf1 = p[:, :, 2].mean(dim=1), p.amax(dim=2).mean(dim=1)
    q, z = scores(model, exemplars)
    now = torch.stack([q[:, z == c, c].mean(dim=1) for c in (0, 1)], dim=1)  # mu^N of the old classes
    s = method.stats
    assert s["state"].tolist() == [0, 0, 1]
    torch.testing.assert_close(s["initial"], torch.cat([mu0, mu2[:, None]], dim=1))  # mu^P kept from state 0
    torch.testing.assert_close(s["current"], torch.cat([now, mu2[:, None]], dim=1))
    torch.testing.assert_close(s["confidence"], torch.stack([conf0, conf1], dim=1))
    factor = mu0 / now * (conf1 / conf0)[:, None]  # Eq. 1 for classes 0 and 1
    torch.testing.assert_close(method.rectification(), torch.cat([factor, torch.ones(2, 1)], dim=1))

    x = inputs([0, 1, 2, 0, 1, 2, 0, 1], 6)
    model.eval()
    raw = predict(model(x.spectrograms, x.frames))
    got = method.predict(x)
    branches = set()
    for m, (r, g) in enumerate(((raw.p_a, got.p_a), (raw.p_v, got.p_v))):
        top_new = r.argmax(dim=1) == 2
        branches |= set(top_new.tolist())
        want = torch.where(top_new[:, None], r * torch.cat([factor[m], torch.ones(1)]), r)
        torch.testing.assert_close(g, want)
        torch.testing.assert_close(g[:, 2], r[:, 2])  # a new class's score is never changed
    torch.testing.assert_close(got.p_av, got.p_a * got.p_v)
    assert branches == {True, False}  # the batch has samples of both cases

    fresh = IL2M(model, TINY)  # a resume or a rescore: a fresh method loads the saved state
    fresh.load_state_dict(method.state_dict())
    for got_again, want in zip(fresh.predict(x), got):
        torch.testing.assert_close(got_again, want)


def test_an_old_class_without_exemplars_is_refused():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=2)
    method = IL2M(model, TINY)
    method.end_task(Task(0, (), (0, 1)), data([inputs([0, 1], 0)], []))
    model.grow(1)
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        method.end_task(Task(1, (0, 1), (2,)), data([inputs([2, 2], 1)], [inputs([0, 2], 2)]))


def test_il2m_keeps_a_buffer_and_has_no_options():
    assert IL2M.NEEDS_BUFFER and IL2M.OPTIONS == ()
