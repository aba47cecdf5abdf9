"""L2P: key matching (the top-N keys by cosine, not by dot product) and its surrogate loss against
hand-computed values, what trains after the first task (prompts, keys, classifier; never the frozen
encoders and phi, whose BatchNorm statistics stay), the prompt pool in state_dict, and the trainer
optimising the method's own parameters."""
from __future__ import annotations

import math

import pytest
import torch

from cign_train.losses import grouping_bce
from cign_train.methods import get_method
from cign_train.methods import l2p
from cign_train.methods.l2p import FROZEN, L2P, query, select
from cign_train.model import predict
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer
from tiny import TINY, at_task, inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def frozen_parameters(method: L2P) -> list[torch.nn.Parameter]:
    return [p for name in FROZEN for p in getattr(method.model, name).parameters()]


def test_defaults_are_the_papers():
    assert get_method("l2p") is L2P and not L2P.NEEDS_BUFFER
    assert L2P.resolve_options({}) == {"l2p_pool_size": 10, "l2p_length": 5, "l2p_top_n": 5, "l2p_lambda": 0.1}
    method = at_task(L2P, 0)
    assert method.pool["a"].shape == method.pool["v"].shape == (10, 5, 32)
    assert method.keys["a"].shape == method.keys["v"].shape == (10, 32)
    with pytest.raises(ValueError, match="l2p_top_n must be in 1..l2p_pool_size"):
        L2P(method.model, TINY, {"l2p_top_n": 11})


def test_select_picks_the_top_n_keys_by_cosine_not_by_dot_product():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [4.0, 1.0]])
    q = torch.tensor([[2.0, 0.0], [-3.0, 1.0]])
    nearest, distance = select(q, keys, 3)
    # q0 along x: cos = 1, 0, 1/sqrt2, -1, 4/sqrt17; a dot product would rank the long key 4 first (8 > 2)
    # q1 = (-3, 1): cos = -3/sqrt10, 1/sqrt10, -2/sqrt20, 3/sqrt10, -11/sqrt170
    assert nearest.tolist() == [[0, 4, 2], [3, 1, 2]]
    expected = torch.tensor([[0.0, 1 - 4 / math.sqrt(17), 1 - 1 / math.sqrt(2)],
                             [1 - 3 / math.sqrt(10), 1 - 1 / math.sqrt(10), 1 + 2 / math.sqrt(20)]])
    torch.testing.assert_close(distance, expected)


def test_the_surrogate_pulls_only_the_chosen_key_along_the_cosine_gradient():
    keys = torch.tensor([[1.0, 1.0], [0.0, -1.0], [-1.0, 0.0]], requires_grad=True)
    nearest, distance = select(torch.tensor([[3.0, 0.0]]), keys, 1)
    assert nearest.tolist() == [[0]] and distance.item() == pytest.approx(1 - 1 / math.sqrt(2))
    distance.sum().backward()
    # d(1 - cos)/dk = -(q/(|q||k|) - cos k/|k|^2) = -((1, 0)/sqrt2 - (1, 1)/(2 sqrt2)) at k = (1, 1)
    s = 1 / (2 * math.sqrt(2))
    torch.testing.assert_close(keys.grad, torch.tensor([[-s, s], [0.0, 0.0], [0.0, 0.0]]))


def test_observe_adds_lambda_times_the_surrogate_summed_over_the_chosen_keys_and_both_modalities(monkeypatch):
    method = at_task(L2P, 1, l2p_pool_size=4, l2p_top_n=2, l2p_lambda=0.5)
    e = torch.eye(32)
    q_a, q_v = torch.stack([e[0], e[1]]), torch.stack([e[0] + e[1], e[2]])
    monkeypatch.setattr(l2p, "query", lambda model, batch: (q_a, q_v))
    with torch.no_grad():
        for m in "av":
            method.keys[m].copy_(torch.stack([e[0], e[0] + e[1], -e[1], e[1] + 2 * e[2]]))
    # audio: e0 picks keys 0, 1 (gamma 0 and 1 - 1/sqrt2); e1 keys 1, 3 (1 - 1/sqrt2 and 1 - 1/sqrt5)
    audio = (2 * (1 - 1 / math.sqrt(2)) + 1 - 1 / math.sqrt(5)) / 2
    # visual: e0 + e1 picks keys 1, 0 (0 and 1 - 1/sqrt2); e2 key 3 (1 - 2/sqrt5), then one at cos 0 (gamma 1)
    visual = (1 - 1 / math.sqrt(2) + 2 - 2 / math.sqrt(5)) / 2
    x = inputs(0, [2, 2])
    terms = method.observe(x)
    assert terms["pull"].item() == pytest.approx(0.5 * (audio + visual), rel=1e-6)
    prompts, _ = method.prompts(x)
    assert torch.equal(prompts["prompts_a"][0][0], method.pool["a"][[0, 1]].flatten(0, 1))
    out = method.model(x.spectrograms, x.frames, **prompts)
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, x.labels).item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item() + terms["pull"].item(),
                                                  rel=1e-6)


def test_after_the_first_task_prompts_keys_and_classifier_learn_and_the_frozen_parts_get_no_gradient():
    method = at_task(L2P, 1, l2p_top_n=2)
    model = method.model
    x = inputs(1, [2, 2])
    prompts, _ = method.prompts(x)
    plain, prompted = model(x.spectrograms, x.frames), model(x.spectrograms, x.frames, **prompts)
    assert not torch.allclose(plain.logits_a, prompted.logits_a, atol=1e-3)
    assert not torch.allclose(plain.logits_v, prompted.logits_v, atol=1e-3)

    method.observe(x)["total"].backward()
    assert all(not p.requires_grad and p.grad is None for p in frozen_parameters(method))
    for p in (model.tokens, model.head_a.weight, model.head_v.weight, model.group_a.w_q.weight, model.token_cls.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for m, q in zip("av", query(model, x)):
        chosen = torch.zeros(10, dtype=torch.bool)
        chosen[select(q, method.keys[m], 2)[0].flatten()] = True  # at most 4 of the 10
        for p in (method.pool[m], method.keys[m]):
            per_row = p.grad.flatten(1).abs().sum(dim=1)
            assert (per_row[chosen] > 0).all() and (per_row[~chosen] == 0).all()


def test_frozen_encoders_keep_their_batchnorm_statistics_through_the_trainers_train_mode():
    method = at_task(L2P, 1)
    model = method.model
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()  # what the trainer does every epoch
    method.observe(inputs(2, [2, 2, 2]))
    assert not any(getattr(model, name).training for name in FROZEN) and model.head_a.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_first_task_trains_everything_and_the_query_leaves_the_encoders_as_it_found_them():
    method = at_task(L2P, 0)
    model = method.model.train()
    stats = {k: v.clone() for k, v in model.audio_encoder.state_dict().items() if "running" in k}
    x = inputs(3, [0, 1, 1])
    q_a, q_v = query(model, x)
    assert model.audio_encoder.training and model.visual_encoder.training
    assert all(torch.equal(v, model.audio_encoder.state_dict()[k]) for k, v in stats.items())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(q_a, model.audio_encoder(x.spectrograms))
        torch.testing.assert_close(q_v, model.visual_encoder(x.frames).mean(dim=1))
    model.train()
    method.observe(x)["total"].backward()
    for p in (*frozen_parameters(method), method.pool["a"], method.keys["v"]):
        assert p.requires_grad
    assert all(p.grad is not None for p in model.audio_encoder.parameters())
    assert all(p.grad is not None for p in model.phi_v.parameters())


def test_predict_uses_each_clips_chosen_prompts():
    method = at_task(L2P, 1)
    model = method.model.eval()
    x = inputs(4, [2, 0, 1])
    with torch.no_grad():
        p = method.predict(x)
        q_a, q_v = query(model, x)
        by_hand = {f"prompts_{m}": {0: method.pool[m][select(q, method.keys[m], 5)[0]].flatten(1, 2)}
                   for m, q in zip("av", (q_a, q_v))}
        expected = predict(model(x.spectrograms, x.frames, **by_hand))
        plain = predict(model(x.spectrograms, x.frames))
    for got, want in zip(p, expected):
        assert torch.equal(got, want)
    assert not torch.allclose(p.p_av, plain.p_av, atol=1e-4)


def test_state_dict_restores_pools_and_keys(tmp_path):
    method = at_task(L2P, 1)
    with torch.no_grad():
        method.pool["v"] += 1.0
    state = method.state_dict()
    assert set(state) == {"pool_a", "pool_v", "keys_a", "keys_v"}
    with torch.no_grad():
        method.keys["a"] += 1.0  # a copy: later training does not change what was saved
    assert not torch.equal(state["keys_a"], method.keys["a"])
    torch.save(state, tmp_path / "state.pt")  # as in a task checkpoint
    fresh = L2P(method.model, TINY)
    assert not torch.equal(fresh.pool["v"], method.pool["v"])
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for m in "av":
        assert torch.equal(fresh.pool[m], method.pool[m])
        assert torch.equal(fresh.keys[m], state[f"keys_{m}"])
    assert fresh.parameters()[0] is fresh.pool["a"]  # restored in place: the optimizer's parameters


def test_the_trainer_optimises_the_prompts_and_leaves_the_frozen_parts_as_the_first_task_left_them(tiny_avdigits,
                                                                                                 tmp_path):
    """A 2-task run: the pools and keys move during the second task (the optimizer has them), while
    the encoders and phi, BatchNorm statistics included, end the second task exactly as the first."""
    settings = TrainSettings(dataset="avdigits", data_dir=str(tiny_avdigits), spec="cpu", tasks=2, epochs=1,
                             batch_size=8, lr=1e-3, max_per_class=4, workers=0, model=TINY, method="l2p")
    Trainer(settings, tmp_path / "run", progress=False).run()
    first, second = (torch.load(tmp_path / "run" / f"task_{t}.pt", weights_only=True) for t in (0, 1))
    for name in ("pool_a", "pool_v", "keys_a", "keys_v"):
        assert not torch.equal(first["method_state"][name], second["method_state"][name]), name
    for k, v in first["model"].items():
        if k.split(".")[0] in FROZEN:
            assert torch.equal(v, second["model"][k]), k
        elif k.startswith(("head_a", "group_v")):
            assert not torch.equal(v, second["model"][k]), k
