"""BiC: the bias layers against hand-computed logits (each task's scalars on its own classes only), stage 2
on a frozen model (the holdout's cross-entropy falls, alpha and beta move, the weights do not), stage 1's
lambda = n / (n + m) and its distillation of the teacher's corrected outputs, the state a resume carries,
and the trainer's holdout: exactly HOLDOUT clips per seen class, none of them trained on, and nothing
withheld for a method without a HOLDOUT."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cign_train.buffer import RehearsalBuffer
from cign_train.losses import grouping_bce, token_independence
from cign_train.methods import Inputs, Method, Task, TaskData, get_method
from cign_train.methods.bic import BiC
from cign_train.methods.lwf import distillation
from cign_train.model import CIGN
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer, make_plan, train_indices
from tiny import TINY, GivenLogits, at_task, inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def nothing():
    return iter(())


def test_defaults_and_holdout_follow_the_options():
    assert get_method("bic") is BiC and BiC.NEEDS_BUFFER
    assert BiC.resolve_options({}) == {"bic_holdout": 5, "bic_temperature": 2.0, "bic_epochs": 250, "bic_lr": 1e-3}
    assert BiC(GivenLogits(), TINY).HOLDOUT == 5 and BiC(GivenLogits(), TINY, {"bic_holdout": 2}).HOLDOUT == 2
    assert Method.HOLDOUT == 0 and get_method("il2m").HOLDOUT == 0
    with pytest.raises(ValueError, match="bic_holdout must be at least 1"):
        BiC(GivenLogits(), TINY, {"bic_holdout": 0})


def test_each_bias_layer_touches_only_its_own_tasks_logits():
    method = BiC(GivenLogits(), TINY)
    # classes 0, 1 of task 0 (identity), 2, 3 of task 1, 4 of task 2; class 5 is new (no layer yet)
    method.load_state_dict({"alpha": torch.tensor([[1.0, 0.5, 2.0], [1.0, 3.0, 0.25]]),
                            "beta": torch.tensor([[0.0, -1.0, 1.0], [0.0, 2.0, -4.0]]),
                            "task": torch.tensor([0, 0, 1, 1, 2])})
    o_a = torch.tensor([[1.0, 2.0, 4.0, -2.0, 3.0, 0.5]])
    o_v = torch.tensor([[-1.0, 0.0, 1.0, 2.0, 8.0, -3.0]])
    q_a = torch.tensor([[1.0, 2.0, 0.5 * 4 - 1, 0.5 * -2 - 1, 2 * 3 + 1, 0.5]])
    q_v = torch.tensor([[-1.0, 0.0, 3 * 1 + 2, 3 * 2 + 2, 0.25 * 8 - 4, -3.0]])
    out = method.predict(Inputs(o_a, o_v, torch.tensor([0])))
    torch.testing.assert_close(out.p_a, q_a.sigmoid())
    torch.testing.assert_close(out.p_v, q_v.sigmoid())
    torch.testing.assert_close(out.p_av, q_a.sigmoid() * q_v.sigmoid())
    assert out.p_a.argmax().item() == 4 and out.p_v.argmax().item() == 3  # raw: 2 and 4


def test_stage_2_moves_the_new_classes_logits_toward_the_right_class():
    """Audio over-scores the new class 2, visual under-scores it: eq 5 lowers beta_a, raises beta_v,
    and both modalities' argmax becomes the label on the holdout."""
    method = BiC(GivenLogits(), TINY, {"bic_epochs": 300, "bic_lr": 0.1})
    method.end_task(Task(0, (), (0, 1)), TaskData(nothing, nothing))  # the identity: no old classes
    assert method.layers["alpha"].tolist() == [[1.0], [1.0]] and method.layers["beta"].tolist() == [[0.0], [0.0]]
    o_a = torch.tensor([[2.0, 0.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    o_v = torch.tensor([[1.0, 0.0, -2.0], [0.0, 1.0, -2.0], [0.0, 0.0, -1.0]])
    holdout = Inputs(o_a, o_v, torch.tensor([0, 1, 2]))
    assert method.predict(holdout).p_a.argmax(1).tolist() == [2, 2, 2]
    method.end_task(Task(1, (0, 1), (2,)), TaskData(nothing, nothing, lambda: iter([holdout])))
    beta = method.layers["beta"][:, 1]
    assert beta[0] < 0 < beta[1]
    out = method.predict(holdout)
    assert out.p_a.argmax(1).tolist() == [0, 1, 2] and out.p_v.argmax(1).tolist() == [0, 1, 2]
    assert method.layers["task"].tolist() == [0, 0, 1]


def test_stage_2_lowers_the_holdout_cross_entropy_on_a_frozen_model():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=2)
    method = BiC(model, TINY, {"bic_epochs": 50, "bic_lr": 0.05})
    method.end_task(Task(0, (), (0, 1)), TaskData(nothing, nothing))
    model.grow(1)
    holdout = [inputs(0, [0, 1, 2, 2]), inputs(1, [1, 0, 2])]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.end_task(Task(1, (0, 1), (2,)), TaskData(nothing, nothing, lambda: iter(holdout)))
    assert model.training  # the fit (in eval mode) leaves the mode as it found it
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    model.eval()
    with torch.no_grad():
        outs = [model(b.spectrograms, b.frames) for b in holdout]
    y = torch.cat([b.labels for b in holdout])
    alpha, beta = method.layers["alpha"][:, 1], method.layers["beta"][:, 1]
    assert (alpha != 1).all() and (beta != 0).all()
    for m, name in enumerate(("logits_a", "logits_v")):
        o = torch.cat([getattr(x, name) for x in outs])
        q = torch.cat([o[:, :2], alpha[m] * o[:, 2:] + beta[m]], dim=1)  # eq 4 by hand
        assert F.cross_entropy(q, y) < F.cross_entropy(o, y)  # eq 5 against the identity


def test_a_holdout_without_every_seen_class_is_refused():
    method = BiC(GivenLogits(), TINY)
    method.end_task(Task(0, (), (0, 1)), TaskData(nothing, nothing))
    x = Inputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        method.end_task(Task(1, (0, 1), (2,)), TaskData(nothing, nothing, lambda: iter([x])))
    with pytest.raises(ValueError, match="no holdout clips"):
        method.end_task(Task(1, (0, 1), (2,)), TaskData(nothing, nothing))


def test_first_task_is_fine_tuning():
    method = at_task(BiC, 0)
    assert method.teacher is None
    x = inputs(0, [0, 1, 1, 0])
    terms = method.observe(x)
    out = method.model(x.spectrograms, x.frames)
    assert terms["distill"].item() == 0.0
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, x.labels).item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item(), rel=1e-6)


@pytest.mark.parametrize("index, lam", [(1, 2 / 3), (2, 3 / 4)])  # n old classes, one new: n / (n + 1)
def test_lambda_is_old_over_seen_classes(index, lam):
    method = at_task(BiC, index, bic_temperature=3.0)
    method.model.eval()  # the student's BatchNorm as the teacher's
    x = inputs(1, [index + 1, 0, index + 1])
    terms = method.observe(x)
    with torch.no_grad():
        s, t = method.model(x.spectrograms, x.frames), method.teacher(x.spectrograms, x.frames)
    bce = grouping_bce(s.logits_a, s.logits_v, x.labels)
    ce = token_independence(method.model.token_logits(), (index + 1,))
    kd = distillation(s.logits_a, t.logits_a, 3.0) + distillation(s.logits_v, t.logits_v, 3.0)
    assert terms["bce"].item() == pytest.approx((1 - lam) * bce.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx((1 - lam) * ce.item(), rel=1e-5)
    assert terms["distill"].item() == pytest.approx(lam * kd.item(), rel=1e-5) and kd.item() > 0
    assert terms["total"].item() == pytest.approx(sum(terms[k].item() for k in ("bce", "ce", "distill")), rel=1e-6)


def test_distillation_target_is_the_teachers_corrected_outputs():
    """Task 2 (classes 0, 1 of task 0, 2 of task 1, 3 new): task 1's layer corrects class 2 in the
    teacher's and the student's logits alike; the teacher is frozen, in eval mode."""
    method = at_task(BiC, 2)
    method.load_state_dict({"alpha": torch.tensor([[1.0, 0.5], [1.0, 3.0]]),
                            "beta": torch.tensor([[0.0, 2.0], [0.0, -1.0]]), "task": torch.tensor([0, 0, 1])})
    teacher = method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.n_classes == 3 and method.model.n_classes == 4
    method.model.eval()
    x = inputs(2, [3, 1, 3, 2])
    terms = method.observe(x)
    with torch.no_grad():
        s, t = method.model(x.spectrograms, x.frames), teacher(x.spectrograms, x.frames)

    def by_hand(logits, alpha, beta):
        q = logits.clone()
        q[:, 2] = alpha * logits[:, 2] + beta
        return q

    s_a, s_v = by_hand(s.logits_a, 0.5, 2.0), by_hand(s.logits_v, 3.0, -1.0)
    t_a, t_v = by_hand(t.logits_a, 0.5, 2.0), by_hand(t.logits_v, 3.0, -1.0)
    kd = distillation(s_a, t_a, 2.0) + distillation(s_v, t_v, 2.0)
    assert terms["distill"].item() == pytest.approx(0.75 * kd.item(), rel=1e-5)
    raw = distillation(s_a, t.logits_a, 2.0) + distillation(s_v, t.logits_v, 2.0)
    assert abs(raw.item() - kd.item()) > 1e-2  # an uncorrected teacher would give another value
    assert terms["bce"].item() == pytest.approx(0.25 * grouping_bce(s_a, s_v, x.labels).item(), rel=1e-5)

    terms["distill"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    method.end_task(Task(2, (0, 1, 2), (3,)), TaskData(nothing, nothing, lambda: iter([inputs(3, [0, 1, 2, 3])])))
    assert method.teacher is None


def test_state_round_trips_through_a_checkpoint():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=2)
    method = BiC(model, TINY, {"bic_epochs": 5, "bic_lr": 0.05})
    method.end_task(Task(0, (), (0, 1)), TaskData(nothing, nothing))
    model.grow(1)
    method.end_task(Task(1, (0, 1), (2,)), TaskData(nothing, nothing, lambda: iter([inputs(0, [0, 1, 2])])))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = BiC(model, TINY)  # a resume or a rescore
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert set(fresh.layers) == {"alpha", "beta", "task"}
    for k, v in method.layers.items():
        torch.testing.assert_close(fresh.layers[k], v)
    model.eval()
    x = inputs(1, [0, 1, 2])
    for got, want in zip(fresh.predict(x), method.predict(x)):
        torch.testing.assert_close(got, want)
    assert BiC(model, TINY).state_dict() == {}


# ----------------------------------------------------------------------------------------- the trainer
def settings(data_dir, **kw) -> TrainSettings:
    base = dict(dataset="avdigits", data_dir=str(data_dir), spec="cpu", tasks=2, epochs=1, batch_size=8, lr=1e-3,
                buffer_per_class=3, workers=0, model=TINY)
    return TrainSettings(**{**base, **kw})


def spy(monkeypatch, method_cls) -> dict:
    """Record, per task, the clips trained on (``train``), the store clips behind ``end_task``'s holdout
    (``held``) and the labels it yields (``yields``)."""
    seen = {"train": [], "held": [], "yields": []}
    train_epoch, batches, end_task = Trainer.train_epoch, Trainer.batches, method_cls.end_task

    def record_epoch(self, method, model, optimizer, scaler, scheduler, guard, idx, t, epoch, weights=None):
        seen["train"].append(idx.copy())
        return train_epoch(self, method, model, optimizer, scaler, scheduler, guard, idx, t, epoch, weights)

    def tagged(self, idx):
        f = batches(self, idx)
        f.idx = idx
        return f

    def record_end(self, task, data):
        seen["held"].append(data.holdout.idx)
        seen["yields"].append(Counter(int(y) for b in data.holdout() for y in b.labels))
        return end_task(self, task, data)

    monkeypatch.setattr(Trainer, "train_epoch", record_epoch)
    monkeypatch.setattr(Trainer, "batches", tagged)
    monkeypatch.setattr(method_cls, "end_task", record_end)
    return seen


def per_class(plan, idx) -> Counter:
    return Counter(plan.label_map[plan.store.labels[idx]].tolist())


def test_trainer_withholds_exactly_holdout_clips_per_class_and_never_trains_on_them(tiny_avdigits, tmp_path,
                                                                                    monkeypatch):
    """6 training clips per class, 3 exemplars, HOLDOUT 1: a new class trains on 5 and offers 3 of them
    to the buffer, an old class on 2 of its 3 exemplars; the held exemplar stays in the buffer."""
    s = settings(tiny_avdigits, method="bic", method_options={"bic_holdout": 1, "bic_epochs": 2})
    seen = spy(monkeypatch, BiC)
    Trainer(s, tmp_path / "run", progress=False).run()
    plan = make_plan(s)
    first, second = range(5), range(5, 10)
    all_train = {t: train_indices(plan, c, None, s.seed) for t, c in enumerate((first, second))}
    assert per_class(plan, all_train[0]) == {k: 6 for k in first}

    train0, held0 = seen["train"][0], seen["held"][0]
    assert per_class(plan, held0) == {k: 1 for k in first} and seen["yields"][0] == {k: 1 for k in first}
    assert per_class(plan, train0) == {k: 5 for k in first}
    assert not np.isin(held0, train0).any() and set(held0) | set(train0) == set(all_train[0])

    exemplars = torch.load(tmp_path / "run" / "task_0.pt", weights_only=True)["buffer"]
    buffer0 = np.concatenate([np.asarray(ix) for ix in exemplars["indices"]])
    assert len(buffer0) == 15 and not np.isin(held0, buffer0).any()  # chosen among the trained clips

    train1, held1 = seen["train"][1], seen["held"][1]
    assert per_class(plan, held1) == {k: 1 for k in range(10)} and seen["yields"][1] == {k: 1 for k in range(10)}
    assert per_class(plan, train1) == {**{k: 2 for k in first}, **{k: 5 for k in second}}
    assert not np.isin(held1, train1).any()
    old_held = held1[np.isin(held1, all_train[0])]
    assert len(old_held) == 5 and np.isin(old_held, buffer0).all()
    assert set(train1[np.isin(train1, all_train[0])]) | set(old_held) == set(buffer0)
    final = torch.load(tmp_path / "run" / "task_1.pt", weights_only=True)
    assert [len(ix) for ix in final["buffer"]["indices"]] == [3] * 10  # the held exemplars stay
    assert np.isin(old_held, np.concatenate([np.asarray(ix) for ix in final["buffer"]["indices"]])).all()
    assert final["method_state"]["task"].tolist() == [0] * 5 + [1] * 5


def test_a_method_without_holdout_trains_on_every_clip_and_the_buffer_as_before(tiny_avdigits, tmp_path,
                                                                                  monkeypatch):
    s = settings(tiny_avdigits, method="il2m", max_per_class=4)
    seen = spy(monkeypatch, get_method("il2m"))
    Trainer(s, tmp_path / "run", progress=False).run()
    plan = make_plan(s)
    buffer = RehearsalBuffer(s.buffer_per_class, s.buffer_select, s.seed)
    for t, classes in enumerate((range(5), range(5, 10))):
        new = train_indices(plan, classes, 4, s.seed)
        np.testing.assert_array_equal(seen["train"][t], np.union1d(new, buffer.indices))
        assert len(seen["held"][t]) == 0 and seen["yields"][t] == {}
        buffer.update(new, plan.label_map[plan.store.labels[new]])
    final = torch.load(tmp_path / "run" / "task_1.pt", weights_only=True)["buffer"]
    assert final == buffer.state_dict()


@pytest.mark.parametrize("options, message", [
    ({"bic_holdout": 3}, "leaves an old class none of its 3 exemplars"),  # buffer_per_class 3
    ({"bic_holdout": 2}, "withholding 2 clips of class 0 leaves none of its 2"),  # max_per_class 2
])
def test_a_holdout_that_leaves_a_class_nothing_to_train_on_is_refused(tiny_avdigits, tmp_path, options, message):
    s = settings(tiny_avdigits, method="bic", method_options=options, max_per_class=2)
    with pytest.raises(ValueError, match=message):
        Trainer(s, tmp_path / "run", progress=False).run()
