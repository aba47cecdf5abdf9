"""Each CIGN loss term (eqs 8-10) against a hand-computed value, and where its gradient goes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cign_train.config import CIGNConfig
from cign_train.losses import (
    cign_loss,
    continual_grouping,
    contrast_stats,
    grouping_bce,
    token_distillation,
    token_independence,
)
from cign_train.model import CIGN, CIGNOutput

TINY = CIGNConfig(dim=32, depth=1, heads=4)


def softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return CIGN(TINY, n_classes=3)


def test_token_distillation_value_and_gradient():
    cur = [[0.2, -0.4], [1.0, 0.5], [3.0, -3.0]]  # 2 old tokens and 1 new one, D = 2
    old = [[0.0, 0.3], [1.5, -0.5]]
    expected = 0.0
    for c, o in zip(cur, old):  # each token rescaled to unit RMS (norm sqrt(D) = sqrt(2)) first
        p = softmax([x * math.sqrt(2) / math.hypot(*c) for x in c])
        q = softmax([x * math.sqrt(2) / math.hypot(*o) for x in o])
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    tokens = torch.tensor(cur, requires_grad=True)
    old_tokens = torch.tensor(old, requires_grad=True)
    kl = token_distillation(tokens, old_tokens)
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    kl.backward()
    assert tokens.grad[:2].abs().sum() > 0
    assert torch.all(tokens.grad[2] == 0)  # the new token is free
    assert old_tokens.grad is None  # the teacher's tokens get nothing
    assert token_distillation(torch.tensor(old), torch.tensor(old)).item() == pytest.approx(0.0, abs=1e-7)
    # Only a token's direction counts: a rescaled copy is at zero divergence.
    assert token_distillation(torch.tensor(old) * 3, torch.tensor(old)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_token_distillation_is_a_scaled_cosine_distance(temperature):
    """Unit-RMS logits over T: a token pair at cosine s has KL about (1 - s) / T^2 (random pairs, D = 256)."""
    gen = torch.Generator().manual_seed(0)
    old = F.normalize(torch.randn(64, 256, generator=gen), dim=-1)
    ortho = torch.randn(64, 256, generator=gen)
    ortho = F.normalize(ortho - (ortho * old).sum(-1, keepdim=True) * old, dim=-1)
    for cos in (0.99, 0.97, 0.90):
        cur = cos * old + math.sqrt(1 - cos**2) * ortho
        kl = token_distillation(cur, old, temperature).item() / 64  # the sum over the 64 tokens, per token
        assert kl == pytest.approx((1 - cos) / temperature**2, rel=0.15)


def test_token_independence_value():
    rows = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]
    expected = -math.log(softmax(rows[1])[1]) - math.log(softmax(rows[2])[2])  # new classes 1 and 2
    ce = token_independence(torch.tensor(rows), new_classes=[1, 2])
    assert ce.item() == pytest.approx(expected, rel=1e-6)


def test_token_independence_gradient_reaches_token_cls_and_new_tokens_only(tiny_model):
    tiny_model.zero_grad(set_to_none=True)
    token_independence(tiny_model.token_logits(), new_classes=[2]).backward()
    assert torch.all(tiny_model.tokens.grad[:2] == 0)
    assert tiny_model.tokens.grad[2].abs().sum() > 0
    assert tiny_model.token_cls.weight.grad.abs().sum() > 0
    assert tiny_model.head_a.weight.grad is None
    assert tiny_model.group_v.w_q.weight.grad is None


def test_token_distillation_contextual_value_and_gradient():
    """Per sample (B, K, D): the sum over old classes of the KL, then the mean over samples."""
    cur = [[[0.2, -0.4], [1.0, 0.5], [3.0, -3.0]], [[1.0, 1.0], [-0.5, 2.0], [0.1, 0.1]]]  # B 2, K 3, D 2
    old = [[[0.0, 0.3], [1.5, -0.5]], [[1.0, 1.0], [0.5, 0.5]]]  # C 2
    expected = 0.0
    for sample_cur, sample_old in zip(cur, old):
        for c, o in zip(sample_cur, sample_old):
            p = softmax([x * math.sqrt(2) / math.hypot(*c) for x in c])
            q = softmax([x * math.sqrt(2) / math.hypot(*o) for x in o])
            expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / 2
    tokens = torch.tensor(cur, requires_grad=True)
    kl = token_distillation(tokens, torch.tensor(old))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    kl.backward()
    assert torch.all(tokens.grad[:, 2] == 0)  # the new class's tokens are free
    assert tokens.grad[1, 0].abs().sum() == 0  # sample 1's token 0 already matches the teacher's
    assert tokens.grad[0, :2].abs().sum() > 0


def test_token_independence_contextual_value():
    rows = [[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]],
            [[0.0, 1.0, 0.0], [1.0, -1.0, 2.0], [0.3, 0.2, 0.1]]]  # FC(c_hat_i) per sample, B 2, K 3
    expected = sum(-math.log(softmax(r[1])[1]) - math.log(softmax(r[2])[2]) for r in rows) / 2  # new: 1, 2
    ce = token_independence(torch.tensor(rows), new_classes=[1, 2])
    assert ce.item() == pytest.approx(expected, rel=1e-6)


def test_grouping_bce_value():
    la, lv, labels = [[0.5, -1.0], [2.0, 0.0]], [[-0.3, 0.8], [1.0, -2.0]], [0, 1]

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = sum(
        sum(bce(la[n][i], int(i == labels[n])) + bce(lv[n][i], int(i == labels[n])) for i in range(2))
        for n in range(2)
    ) / 2
    got = grouping_bce(torch.tensor(la), torch.tensor(lv), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_grouping_bce_gradient_reaches_heads(tiny_model):
    tiny_model.zero_grad(set_to_none=True)
    g_a, g_v = torch.randn(2, 3, 32, requires_grad=True), torch.randn(2, 3, 32, requires_grad=True)
    logits_a, logits_v = tiny_model.head_a(g_a).squeeze(-1), tiny_model.head_v(g_v).squeeze(-1)  # (B, K)
    grouping_bce(logits_a, logits_v, torch.tensor([0, 2])).backward()
    for head in (tiny_model.head_a, tiny_model.head_v):
        assert head.weight.grad.abs().sum() > 0
    assert g_a.grad.abs().sum() > 0 and g_v.grad.abs().sum() > 0  # on to the grouping blocks
    assert tiny_model.token_cls.weight.grad is None  # not part of eq 8's BCE


def continual_case():
    """4 samples, old classes {0, 1}, new class 2, D = 2; anchors are samples 0 and 1."""
    labels = [0, 1, 2, 2]
    g_old = torch.zeros(4, 2, 2)
    g_old[0, 0] = torch.tensor([1.0, 0.0])
    g_old[1, 1] = torch.tensor([0.0, 2.0])
    g_new = torch.randn(4, 3, 2)  # entries off the ground-truth classes must not matter
    g_new[0, 0] = torch.tensor([1.0, 1.0])
    g_new[1, 1] = torch.tensor([0.5, 1.0])
    g_new[2, 2] = torch.tensor([0.0, 1.0])
    g_new[3, 2] = torch.tensor([-1.0, 0.0])
    return g_old, g_new, torch.tensor(labels)


def test_continual_grouping_value():
    g_old, g_new, labels = continual_case()
    tau = 0.5
    negatives = [[0.0, 1.0], [-1.0, 0.0]]
    expected = 0.0
    for anchor, positive in (([1.0, 0.0], [1.0, 1.0]), ([0.0, 2.0], [0.5, 1.0])):
        pos = math.exp(cos(anchor, positive) / tau)
        denom = pos + sum(math.exp(cos(anchor, m) / tau) for m in negatives)
        expected += -math.log(pos / denom) / 2
    got = continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=tau, negatives="label")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > 0  # the positive is in the denominator: bounded below by 0


def test_continual_grouping_paper_denominator_value_and_bound():
    g_old, g_new, labels = continual_case()
    tau = 0.5
    negatives = [[0.0, 1.0], [-1.0, 0.0]]
    expected = 0.0
    for anchor, positive in (([1.0, 0.0], [1.0, 1.0]), ([0.0, 2.0], [0.5, 1.0])):
        denom = sum(math.exp(cos(anchor, m) / tau) for m in negatives)  # negatives only, as eq 9 is written
        expected += (math.log(denom) - cos(anchor, positive) / tau) / 2
    got = continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=tau, denominator="paper", negatives="label")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # bounded below with cosine similarity: >= log M - 2 / tau (M = 2 negatives); here it goes negative
    assert math.log(2) - 2 / tau <= got.item() < 0


def test_continual_grouping_runs_in_fp32_under_bf16_autocast():
    """A saturated InfoNCE: positives on their anchors (sim 1 / tau = 10), negatives at cosine 0.5 (sim
    5), so the loss is log(1 + 2 e^-5) = 0.0134. In bf16, whose spacing near 10 is 0.0625, the
    log-sum-exp rounds to 10 and the loss to exactly 0."""
    labels = torch.tensor([0, 1, 2, 2])
    g_old, g_new = torch.zeros(4, 2, 2), torch.zeros(4, 3, 2)
    g_old[0, 0] = g_old[1, 1] = g_new[0, 0] = g_new[1, 1] = torch.tensor([1.0, 0.0])
    g_new[2, 2], g_new[3, 2] = torch.tensor([0.5, 0.75**0.5]), torch.tensor([0.5, -(0.75**0.5)])
    expected = math.log(1 + 2 * math.exp(-5))
    assert continual_grouping(g_old, g_new, labels, [0, 1], tau=0.1, negatives="label").item() == pytest.approx(
        expected, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = continual_grouping(g_old.bfloat16(), g_new.bfloat16(), labels, [0, 1], tau=0.1, negatives="label")
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(expected, rel=1e-2)  # bf16 inputs
    in_bf16 = torch.logsumexp(torch.tensor([10.0, 5.0, 5.0]).bfloat16(), 0) - 10  # the same sums in bf16
    assert in_bf16.item() == 0.0


def test_contrast_stats_by_hand():
    g_old, g_new, labels = continual_case()
    tau = 0.5
    negatives = [[0.0, 1.0], [-1.0, 0.0]]
    pairs = (([1.0, 0.0], [1.0, 1.0]), ([0.0, 2.0], [0.5, 1.0]))
    stats = contrast_stats(g_old, g_new, labels, old_classes=[0, 1], tau=tau, negatives="label")
    assert stats["cos_pos"].item() == pytest.approx(sum(cos(a, p) for a, p in pairs) / 2, rel=1e-5)
    assert stats["cos_neg"].item() == pytest.approx(sum(cos(a, m) for a, _ in pairs for m in negatives) / 4, rel=1e-5)
    p_pos = [softmax([cos(a, p) / tau] + [cos(a, m) / tau for m in negatives])[0] for a, p in pairs]
    assert stats["p_pos"].item() == pytest.approx(sum(p_pos) / 2, rel=1e-5)
    assert contrast_stats(g_old, g_new, torch.tensor([2, 2, 2, 2]), [0, 1], tau) == {}


def test_continual_grouping_maxpool_value():
    """``maxpool``: each new-class sample's negative is its class slot most similar to the anchor,
    the anchor's own slot included (the paper's max-pooling of the similarities)."""
    g_old, g_new, labels = continual_case()
    g_new[2] = torch.tensor([[0.9, 0.1], [0.1, 1.0], [1.0, -1.0]])  # sample 2: slot 0 is anchor 0's nearest
    g_new[3] = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])  # sample 3: slot 1 is nearest to both
    tau = 0.5
    expected = 0.0
    for anchor, positive in (([1.0, 0.0], [1.0, 1.0]), ([0.0, 2.0], [0.5, 1.0])):
        negs = [max(cos(anchor, slot) for slot in g_new[m].tolist()) for m in (2, 3)]
        pos = math.exp(cos(anchor, positive) / tau)
        expected += -math.log(pos / (pos + sum(math.exp(x / tau) for x in negs))) / 2
    got = continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=tau, negatives="maxpool")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    label = continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=tau, negatives="label")
    assert got.item() > label.item()  # a harder negative than the one at the sample's own class
    stats = contrast_stats(g_old, g_new, labels, [0, 1], tau)
    assert stats["cos_neg"].item() == pytest.approx(
        sum(max(cos(a, slot) for slot in g_new[m].tolist()) for a in ([1.0, 0.0], [0.0, 2.0]) for m in (2, 3)) / 4,
        rel=1e-5)
    # anchor 0's max lands on slot 0 of sample 2 and slot 1 of sample 3; anchor 1's on slot 1 of both
    assert stats["own_slot"].item() == pytest.approx(3 / 4)
    assert "own_slot" not in contrast_stats(g_old, g_new, labels, [0, 1], tau, negatives="label")


def test_continual_grouping_maxpool_gradient_reaches_the_chosen_slots_only():
    g_old, g_new, labels = continual_case()
    g_new[2] = torch.tensor([[0.9, 0.1], [0.1, 1.0], [1.0, -1.0]])
    g_new[3] = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    g_new.requires_grad_(True)
    continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=0.5).backward()
    used = torch.zeros(4, 3, dtype=torch.bool)
    used[[0, 1, 2, 2, 3], [0, 1, 0, 1, 1]] = True  # positives; sample 2's max slots 0 (anchor 0), 1 (anchor 1)
    norms = g_new.grad.abs().sum(dim=-1)  # (B, K)
    assert torch.all(norms[used] > 0) and torch.all(norms[~used] == 0)


def test_continual_grouping_gradient_reaches_student_only():
    g_old, g_new, labels = continual_case()
    g_old.requires_grad_(True)
    g_new.requires_grad_(True)
    continual_grouping(g_old, g_new, labels, old_classes=[0, 1], tau=0.1, negatives="label").backward()
    assert g_old.grad is None
    used = torch.zeros(4, 3, dtype=torch.bool)
    used[[0, 1, 2, 3], [0, 1, 2, 2]] = True
    norms = g_new.grad.abs().sum(dim=-1)  # (B, K)
    assert torch.all(norms[used] > 0)
    assert torch.all(norms[~used] == 0)


@pytest.mark.parametrize("labels", [[0, 1, 0, 1], [2, 2, 2, 2]])
def test_continual_grouping_is_zero_without_old_or_new_samples(labels):
    g_old, g_new, _ = continual_case()
    g_new.requires_grad_(True)
    loss = continual_grouping(g_old, g_new, torch.tensor(labels), old_classes=[0, 1], tau=0.1)
    assert loss.item() == 0.0 and loss.device == g_new.device
    loss.backward()  # differentiable
    assert torch.all(g_new.grad == 0)


def synthetic_step():
    torch.manual_seed(1)
    b, k, c, d = 4, 3, 2, 8
    out = CIGNOutput(*(torch.randn(b, k) for _ in range(2)), *(torch.randn(b, k, d) for _ in range(4)))
    teacher = CIGNOutput(*(torch.randn(b, c) for _ in range(2)), *(torch.randn(b, c, d) for _ in range(4)))
    tokens, fc = torch.randn(k, d), torch.nn.Linear(d, k)
    kwargs = dict(token_logits=lambda t=None: fc(tokens if t is None else t), tokens=tokens,
                  old_tokens=torch.randn(c, d), teacher_out=teacher, old_classes=[0, 1], new_classes=[2])
    return out, torch.tensor([0, 2, 1, 2]), kwargs


def test_cign_loss_sums_all_terms():
    out, labels, kw = synthetic_step()
    terms = cign_loss(out, labels, cfg=TINY, **kw)
    t, logits = kw["teacher_out"], kw["token_logits"]
    assert terms["bce"].item() == pytest.approx(grouping_bce(out.logits_a, out.logits_v, labels).item())
    # contextual (default): both modalities' contextualised tokens, against the teacher's on the same batch
    kl = token_distillation(out.c_a, t.c_a) + token_distillation(out.c_v, t.c_v)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    ce = token_independence(logits(out.c_a), [2]) + token_independence(logits(out.c_v), [2])
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    ctl = sum(continual_grouping(g_t, g_s, labels, [0, 1], TINY.tau).item()
              for g_t, g_s in ((t.g_a, out.g_a), (t.g_v, out.g_v)))
    assert terms["ctl"].item() == pytest.approx(ctl, rel=1e-6)
    assert all(terms[n].item() > 0 for n in ("bce", "kl", "ce", "ctl"))
    parts = terms["bce"] + terms["kl"] + terms["ce"] + terms["ctl"]
    assert terms["total"].item() == pytest.approx(parts.item())
    # eq 9's diagnostics per modality, not part of the total
    assert {k for k in terms if k.startswith("diag/")} == {f"diag/ctl_{s}_{m}" for s in ("cos_pos", "cos_neg", "p_pos", "own_slot")
                                                          for m in "av"}
    stats = contrast_stats(t.g_v, out.g_v, labels, [0, 1], TINY.tau)
    assert terms["diag/ctl_p_pos_v"].item() == pytest.approx(stats["p_pos"].item())


def test_cign_loss_table_source_reads_the_token_table():
    out, labels, kw = synthetic_step()
    terms = cign_loss(out, labels, cfg=CIGNConfig(dim=32, depth=1, heads=4, token_source="table"), **kw)
    assert terms["kl"].item() == pytest.approx(token_distillation(kw["tokens"], kw["old_tokens"]).item())
    assert terms["ce"].item() == pytest.approx(token_independence(kw["token_logits"](), [2]).item())


@pytest.mark.parametrize(
    "avctd, avcg, dropped",
    [(False, True, {"kl", "ce"}), (True, False, {"ctl"}), (False, False, {"kl", "ce", "ctl"})],
)
def test_cign_loss_switches_drop_terms(avctd, avcg, dropped):
    out, labels, kw = synthetic_step()
    full = cign_loss(out, labels, cfg=TINY, **kw)
    cfg = CIGNConfig(dim=32, depth=1, heads=4, use_avctd=avctd, use_avcg=avcg)
    terms = cign_loss(out, labels, cfg=cfg, **kw)
    for name in ("bce", "kl", "ce", "ctl"):
        assert terms[name].item() == (0.0 if name in dropped else pytest.approx(full[name].item()))
    kept = sum(full[n].item() for n in ("bce", "kl", "ce", "ctl") if n not in dropped)
    assert terms["total"].item() == pytest.approx(kept, rel=1e-6)


def test_cign_loss_first_task_has_no_teacher_terms():
    out, labels, kw = synthetic_step()
    terms = cign_loss(out, labels, cfg=TINY, token_logits=kw["token_logits"], tokens=kw["tokens"],
                      new_classes=[0, 1, 2])  # first task: no teacher, no old classes
    assert terms["kl"].item() == 0.0 and terms["ctl"].item() == 0.0
    assert terms["ce"].item() > 0
    assert terms["total"].item() == pytest.approx(terms["bce"].item() + terms["ce"].item())
