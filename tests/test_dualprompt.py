"""DualPrompt: which phi layers take the G- and E-prompts (both on the cpu preset's single layer), the
task chosen at inference by the key of largest cosine, training with the task's own E-prompt and the
matching loss against hand-computed values, what trains after the first task, the prompts in
state_dict, and the trainer optimising the current task's prompts only."""
from __future__ import annotations

import math

import pytest
import torch

from cign_train.config import CIGNConfig
from cign_train.methods import Task, get_method
from cign_train.methods import dualprompt
from cign_train.methods.dualprompt import DualPrompt, nearest_task, placement
from cign_train.methods.l2p import FROZEN
from cign_train.model import predict
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer
from tiny import TINY, at_task, inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_papers():
    assert get_method("dualprompt") is DualPrompt and not DualPrompt.NEEDS_BUFFER
    assert DualPrompt.resolve_options({}) == {"dualprompt_g_length": 5, "dualprompt_e_length": 20,
                                              "dualprompt_g_layers": 2, "dualprompt_e_layers": 3,
                                              "dualprompt_lambda": 1.0}
    method = at_task(DualPrompt, 1)
    assert method.g["a"].shape == method.g["v"].shape == (1, 5, 32)
    assert [e.shape for e in method.e["v"]] == [(1, 20, 32)] * 2 and [k.shape for k in method.keys["a"]] == [(32,)] * 2


def test_placement_puts_g_on_the_first_layers_and_e_after_them_or_on_the_last_layer():
    assert placement(12, 2, 3) == (range(0, 2), range(2, 5))  # the paper: G at layers 1-2, E at 3-5 of ViT-B
    assert placement(3, 2, 3) == (range(0, 2), range(2, 3))  # the paper preset's phi
    assert placement(2, 2, 3) == (range(0, 2), range(1, 2))  # G fills phi: E shares its last layer
    assert placement(1, 2, 3) == (range(0, 1), range(0, 1))  # the cpu preset: both on the single layer
    assert placement(3, 0, 2) == (range(0, 0), range(0, 2))


@pytest.mark.parametrize("depth, lengths", [(1, [[5 + 20]]), (3, [[5], [5, 5], [5, 5, 20]])])
def test_prompts_enter_phi_at_their_layers(depth, lengths):
    """Sequence lengths entering each layer of phi_a (1 feature) and phi_v (cnn8: 8 x 8 locations at 64 px),
    K = 2, plus the prompt vectors added so far (prompt tuning: earlier layers' prompts stay in the sequence)."""
    cfg = CIGNConfig(encoder="cnn8", dim=32, depth=depth, heads=4)
    method = at_task(DualPrompt, 0, cfg)
    seen = {"a": [], "v": []}
    for m in "av":
        for layer in getattr(method.model, f"phi_{m}").layers:
            layer.register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0].shape[1]))
    method.observe(inputs(0, [0, 1]))
    assert seen["a"] == [sum(n) + 1 + 2 for n in lengths] and seen["v"] == [sum(n) + 64 + 2 for n in lengths]


def test_nearest_task_is_the_key_of_largest_cosine_not_of_largest_dot_product():
    keys = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[2.0, 0.0], [-1.0, 3.0]])
    # q0: cos 1/sqrt2, 1, 0 (dot 10, 2, 0); q1: cos 2/sqrt20, -1/sqrt10, 3/sqrt10 (dot 10, -1, 3)
    assert nearest_task(q, keys).tolist() == [1, 2]


def test_training_uses_the_tasks_own_e_prompt_and_pulls_only_its_key(monkeypatch):
    method = at_task(DualPrompt, 1, dualprompt_lambda=0.5)
    e = torch.eye(32)
    q_a, q_v = torch.stack([e[0], e[0] + e[1]]), torch.stack([e[2], e[3]])
    monkeypatch.setattr(dualprompt, "query", lambda model, batch: (q_a, q_v))
    with torch.no_grad():
        for m, q in (("a", q_a), ("v", q_v)):
            method.keys[m][0].copy_(q[0] + q[1])  # inference would choose task 0 for 3 of the 4 queries ...
        method.keys["a"][1].copy_(e[0] - e[1])  # ... but task 1 trains: gamma 1 - 1/sqrt2 and 1 (audio),
        method.keys["v"][1].copy_(e[3])  # 1 and 0 (visual)
    terms = method.observe(inputs(1, [2, 2]))
    assert terms["match"].item() == pytest.approx(0.5 * ((2 - 1 / math.sqrt(2)) / 2 + 1 / 2), rel=1e-6)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item() + terms["match"].item(),
                                                  rel=1e-6)
    terms["total"].backward()
    for m in "av":
        assert method.e[m][0].grad is None and method.keys[m][0].grad is None
        assert method.e[m][1].grad.abs().sum() > 0 and method.keys[m][1].grad.abs().sum() > 0
        assert method.g[m].grad.abs().sum() > 0
    assert method.parameters() == [method.g["a"], method.g["v"], method.e["a"][1], method.e["v"][1],
                                   method.keys["a"][1], method.keys["v"][1]]


def test_after_the_first_task_the_frozen_parts_get_no_gradient_and_keep_their_batchnorm_statistics():
    method = at_task(DualPrompt, 1)
    model = method.model
    x = inputs(2, [2, 2, 2])
    prompts, _ = method.prompts(x, 1)
    plain, prompted = model(x.spectrograms, x.frames), model(x.spectrograms, x.frames, **prompts)
    assert not torch.allclose(plain.logits_a, prompted.logits_a, atol=1e-3)
    assert not torch.allclose(plain.logits_v, prompted.logits_v, atol=1e-3)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()  # what the trainer does every epoch
    method.observe(x)["total"].backward()
    frozen = [p for name in FROZEN for p in getattr(model, name).parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(getattr(model, name).training for name in FROZEN)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    for p in (model.tokens, model.head_v.weight, model.group_a.w_v.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_predict_gives_each_clip_and_modality_the_e_prompt_of_its_nearest_key(monkeypatch):
    method = at_task(DualPrompt, 1)
    model = method.model.eval()
    e = torch.eye(32)
    monkeypatch.setattr(dualprompt, "query", lambda model, batch: (e[[0, 1]], e[[2, 3]]))
    with torch.no_grad():  # audio: clip 0 -> task 1, clip 1 -> task 0; visual the other way round
        for m, keys in (("a", e[[1, 0]]), ("v", e[[2, 3]])):
            for t in (0, 1):
                method.keys[m][t].copy_(keys[t])
    x = inputs(3, [2, 0])

    def with_tasks(t_a: int, t_v: int, b: int):  # clip b with these E-prompts; G and E on the single layer
        prompts = {f"prompts_{m}": {0: torch.cat([method.g[m][0], method.e[m][t][0]])[None]}
                   for m, t in (("a", t_a), ("v", t_v))}
        return predict(model(x.spectrograms[b:b + 1], x.frames[b:b + 1], **prompts))

    with torch.no_grad():
        p = method.predict(x)
        for b, (t_a, t_v) in enumerate(((1, 0), (0, 1))):
            for got, want in zip(p, with_tasks(t_a, t_v, b)):
                torch.testing.assert_close(got[b:b + 1], want)
            assert not torch.allclose(p.p_a[b:b + 1], with_tasks(1 - t_a, t_v, b).p_a, atol=1e-4)
            assert not torch.allclose(p.p_v[b:b + 1], with_tasks(t_a, 1 - t_v, b).p_v, atol=1e-4)


def test_state_dict_restores_every_tasks_prompts_and_the_next_task_adds_its_own(tmp_path):
    method = at_task(DualPrompt, 1)
    with torch.no_grad():
        method.e["a"][0] += 1.0
    state = method.state_dict()
    assert state["e_a"].shape == (2, 1, 20, 32) and state["keys_v"].shape == (2, 32)
    assert state["g_a"].shape == (1, 5, 32)
    torch.save(state, tmp_path / "state.pt")  # as in a task checkpoint
    fresh = DualPrompt(method.model, TINY)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for m in "av":
        assert torch.equal(fresh.g[m], method.g[m])
        assert all(torch.equal(a, b) for a, b in zip(fresh.e[m], method.e[m], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(fresh.keys[m], method.keys[m], strict=True))
    fresh.task = Task(2, (0, 1, 2), (3,))
    fresh.begin_task(fresh.task)
    assert len(fresh.e["a"]) == len(fresh.keys["v"]) == 3
    assert fresh.parameters()[2] is fresh.e["a"][2]


def test_the_trainer_optimises_g_and_the_current_tasks_prompts_only(tiny_avdigits, tmp_path):
    """A 2-task run: in the second task the optimizer moves g and task 1's E-prompts and keys; task 0's
    stay as the first task left them, and so do the frozen encoders and phi."""
    settings = TrainSettings(dataset="avdigits", data_dir=str(tiny_avdigits), spec="cpu", tasks=2, epochs=1,
                             batch_size=8, lr=1e-3, max_per_class=4, workers=0, model=TINY, method="dualprompt")
    Trainer(settings, tmp_path / "run", progress=False).run()
    first, second = (torch.load(tmp_path / "run" / f"task_{t}.pt", weights_only=True) for t in (0, 1))
    one, two = first["method_state"], second["method_state"]
    assert one["e_a"].shape[0] == 1 and two["e_a"].shape[0] == 2
    for m in "av":
        assert not torch.equal(one[f"g_{m}"], two[f"g_{m}"])
        assert torch.equal(one[f"e_{m}"][0], two[f"e_{m}"][0]) and torch.equal(one[f"keys_{m}"][0], two[f"keys_{m}"][0])
    for k, v in first["model"].items():
        if k.split(".")[0] in FROZEN:
            assert torch.equal(v, second["model"][k]), k
