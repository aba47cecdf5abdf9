"""EWC: its penalty against a hand-computed value, zero at the anchor, its Fisher from real gradients,
the multi-task merge, and the state a resume carries."""
from __future__ import annotations

import pytest
import torch

from cign_train.losses import grouping_bce
from cign_train.methods import Inputs, Task, TaskData
from cign_train.methods.ewc import EWC, GROWING
from cign_train.model import CIGN
from tiny import TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed: int, n: int = 2) -> list[Inputs]:
    g = torch.Generator().manual_seed(seed)
    return [Inputs(torch.randn(4, 32, 40, generator=g), torch.randn(4, 3, 64, 64, generator=g),
                   torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def trained_ewc(**options) -> EWC:
    torch.manual_seed(0)
    method = EWC(CIGN(TINY, n_classes=2), TINY, options)
    method.task = Task(0, (), (0, 1))
    method.end_task(method.task, TaskData(lambda: iter(batches(0)), lambda: iter(())))
    return method


def fisher_by_hand(model: CIGN, data: list[Inputs]) -> dict[str, torch.Tensor]:
    """Mean over clips of the squared per-batch gradient of eq 8's BCE, batch-size weighted."""
    model.eval()
    total, n = {}, 0
    for b in data:
        model.zero_grad(set_to_none=True)
        out = model(b.spectrograms, b.frames)
        grouping_bce(out.logits_a, out.logits_v, b.labels).backward()
        for name, p in model.named_parameters():
            if name not in GROWING and p.grad is not None:
                total[name] = total.get(name, 0) + p.grad.pow(2) * len(b.labels)
        n += len(b.labels)
    model.zero_grad(set_to_none=True)
    model.train()
    return {k: v / n for k, v in total.items()}


def test_penalty_is_zero_at_the_anchor_and_lambda_half_f_d2_away_from_it():
    method = trained_ewc(ewc_lambda=10.0)
    assert method.penalty().item() == 0.0  # the weights are where the task left them
    name = "phi_a.norm.weight"
    param = dict(method.model.named_parameters())[name]
    with torch.no_grad():
        param[0] += 0.5
    f = method.fisher[name][0].item()
    assert f > 0
    assert method.penalty().item() == pytest.approx(10.0 / 2 * f * 0.25, rel=1e-5)


def test_penalty_gradient_pulls_back_towards_the_anchor():
    method = trained_ewc()
    param = dict(method.model.named_parameters())["head_a.weight"]
    with torch.no_grad():
        param += 0.1
    method.penalty().backward()
    assert torch.all(param.grad * method.fisher["head_a.weight"].sign() >= 0)
    assert param.grad.abs().sum() > 0
    assert method.model.tokens.grad is None  # the growing token table is not regularised


def test_fisher_is_the_mean_squared_gradient_and_merges_with_alpha():
    method = trained_ewc(ewc_alpha=0.25)
    assert method.model.training  # the Fisher pass (in eval mode) leaves the mode as it found it
    first = fisher_by_hand(method.model, batches(0))
    for name, f in first.items():
        torch.testing.assert_close(method.fisher[name], f, rtol=1e-4, atol=1e-10)
    assert set(method.fisher) == {n for n, _ in method.model.named_parameters() if n not in GROWING}
    with torch.no_grad():  # the second task moves the weights
        for p in method.model.parameters():
            p.mul_(1.1)
    second = fisher_by_hand(method.model, batches(1))
    method.end_task(Task(1, (0, 1), (2,)), TaskData(lambda: iter(batches(1)), lambda: iter(())))
    for name in first:
        torch.testing.assert_close(method.fisher[name], 0.25 * first[name] + 0.75 * second[name], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(method.anchor[name], dict(method.model.named_parameters())[name].detach())


def test_state_dict_restores_the_penalty():
    method = trained_ewc()
    with torch.no_grad():
        method.model.head_v.bias += 1.0
    fresh = EWC(method.model, TINY, {})
    assert fresh.penalty().item() == 0.0
    fresh.load_state_dict(method.state_dict())
    assert fresh.penalty().item() == pytest.approx(method.penalty().item()) and fresh.penalty().item() > 0


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(ValueError, match="has no option"):
        EWC(CIGN(TINY, 2), TINY, {"lambda": 1.0})
    with pytest.raises(ValueError, match="ewc_alpha"):
        EWC(CIGN(TINY, 2), TINY, {"ewc_alpha": "high"})
