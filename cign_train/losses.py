"""CIGN objectives (paper Sec. 3.2-3.3): L = L_ctl + L_group (eq 10).

Pure functions of model outputs and labels; the model's forward never sees labels. Class indices
are global: the K classes seen so far, old classes first, match the rows of the token table.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cign_train.config import CIGNConfig
from cign_train.model import CIGNOutput


def token_distribution(tokens: torch.Tensor) -> torch.Tensor:
    """Log of the distribution of each token over its D features: log softmax(sqrt(D) c / ||c||_2).

    The paper does not say how a token c_i (1 x D) becomes a distribution. A softmax of the raw
    token is nearly uniform (tokens start at std 0.02 and stay small), which leaves eq 8's KL at
    ~1e-5 with no grip. We first rescale each token to unit RMS (c / ||c|| * sqrt(D)), so its
    logits have unit spread whatever its norm: the KL then keeps each old token's feature profile
    (its direction), while its length stays free.
    """
    unit_rms = F.normalize(tokens, dim=-1) * tokens.shape[-1] ** 0.5  # (K, D)
    return F.log_softmax(unit_rms, dim=-1)


def token_distillation(tokens: torch.Tensor, old_tokens: torch.Tensor) -> torch.Tensor:
    """sum_{i <= C} KL(c^t_i || c^{t-1}_i), eq 8's first term, over token_distribution.

    tokens (K, D) are the current model's, old_tokens (C, D) the previous task's (a teacher: no
    gradient). KL(p || q) = sum_d p (log p - log q).
    """
    log_p = token_distribution(tokens[: old_tokens.shape[0]])  # (C, D)
    log_q = token_distribution(old_tokens.detach())  # (C, D)
    return (log_p.exp() * (log_p - log_q)).sum()


def token_independence(token_logits: torch.Tensor, new_classes: Sequence[int]) -> torch.Tensor:
    """sum_{i new} CE(h_i, e_i) with e_i = softmax(FC(c_i)) and h_i one-hot at i, eq 8's second term.

    token_logits (K, K) is FC(c_i) for every token (CIGN.token_logits()); each new token must
    classify as its own class.
    """
    idx = torch.as_tensor(list(new_classes), dtype=torch.long, device=token_logits.device)
    return F.cross_entropy(token_logits[idx], idx, reduction="sum")


def grouping_bce(logits_a: torch.Tensor, logits_v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_i BCE(y_i, p_a,i) + BCE(y_i, p_v,i) over all K seen classes, eq 8's last term; batch mean.

    logits (B, K) are FC(g_i) before the sigmoid, labels (B,) class indices (y one-hot).
    """
    y = F.one_hot(labels, logits_a.shape[1]).to(logits_a.dtype)  # (B, K)
    bce_a = F.binary_cross_entropy_with_logits(logits_a, y, reduction="none").sum(dim=1)  # (B,)
    bce_v = F.binary_cross_entropy_with_logits(logits_v, y, reduction="none").sum(dim=1)  # (B,)
    return (bce_a + bce_v).mean()


def _contrast(g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int]):
    """Eq 9's unit vectors in fp32: anchors g_old[n, y_n] (N, D), positives g_new[n, y_n] (N, D) over the
    old-class samples n, negatives g_new[m, y_m] (M, D) over the new-class samples m; None when the
    batch lacks either."""
    old = torch.isin(labels, torch.as_tensor(list(old_classes), dtype=labels.dtype, device=labels.device))
    if not old.any() or old.all():
        return None
    rows = torch.arange(labels.shape[0], device=labels.device)
    anchor = F.normalize(g_old.detach()[rows[old], labels[old]].float(), dim=-1)
    pos = F.normalize(g_new[rows[old], labels[old]].float(), dim=-1)
    neg = F.normalize(g_new[rows[~old], labels[~old]].float(), dim=-1)
    return anchor, pos, neg


def continual_grouping(
    g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int], tau: float,
    denominator: str = "infonce",
) -> torch.Tensor:
    """One modality's term of L_ctl (eq 9), computed in fp32 (autocast off).

    g_old (B, C, D) comes from the frozen previous model (teacher, no gradient), g_new (B, K, D) from
    the current model on the same inputs; labels (B,). Each sample n whose label is an old class
    (from the rehearsal buffer) is an anchor g_old[n, y_n], with positive g_new[n, y_n]; the negatives
    are the batch's new-class samples m at their ground-truth classes, g_new[m, y_m]. sim is the
    cosine similarity over tau (0.07 by default: the paper gives no value). ``denominator``:
    ``paper`` sums only the negatives, as eq 9 is written: -sim_pos + log sum exp sim_neg, which
    with cosine similarity is bounded below by log M - 2 / tau; ``infonce`` adds the positive
    (>= 0, the form of most contrastive losses). The paper's max-pooling of the similarities is
    not modelled: each anchor has one positive, at its own class slot. fp32 because the InfoNCE
    form saturates near 0 once the positive dominates, where bf16 rounds it to exactly 0. Mean over
    anchors; a (differentiable) 0 when the batch lacks old or new samples.
    """
    return _eq9(_contrast(g_old, g_new, labels, old_classes), g_new, tau, denominator)


def _eq9(parts, g_new: torch.Tensor, tau: float, denominator: str) -> torch.Tensor:
    """``continual_grouping`` on ``_contrast``'s unit vectors (a differentiable 0 without them)."""
    if parts is None:
        return g_new.sum().float() * 0.0
    with torch.autocast(g_new.device.type, enabled=False):
        anchor, pos, neg = parts
        sim_pos = (anchor * pos).sum(dim=-1) / tau  # (N,)
        sim_neg = anchor @ neg.T / tau  # (N, M)
        if denominator == "paper":
            return (torch.logsumexp(sim_neg, dim=1) - sim_pos).mean()
        return (torch.logsumexp(torch.cat([sim_pos[:, None], sim_neg], dim=1), dim=1) - sim_pos).mean()


def contrast_stats(g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int],
                   tau: float) -> dict[str, torch.Tensor]:
    """What eq 9 sees on a batch: mean anchor-positive cosine ``cos_pos``, mean anchor-negative cosine
    ``cos_neg``, and ``p_pos``, the mean softmax probability of the positive among [positive,
    negatives] at tau (near 1: the InfoNCE form has saturated and gives no gradient). Empty when eq 9
    does not apply to the batch."""
    return _stats(_contrast(g_old, g_new, labels, old_classes), tau)


@torch.no_grad()
def _stats(parts, tau: float) -> dict[str, torch.Tensor]:
    """``contrast_stats`` on ``_contrast``'s unit vectors."""
    if parts is None:
        return {}
    anchor, pos, neg = (x.detach() for x in parts)
    sim_pos = (anchor * pos).sum(dim=-1)  # (N,)
    sim_neg = anchor @ neg.T  # (N, M)
    p_pos = torch.softmax(torch.cat([sim_pos[:, None], sim_neg], dim=1) / tau, dim=1)[:, 0]
    return {"cos_pos": sim_pos.mean(), "cos_neg": sim_neg.mean(), "p_pos": p_pos.mean()}


def cign_loss(
    out: CIGNOutput,
    labels: torch.Tensor,
    *,
    cfg: CIGNConfig,
    token_logits: torch.Tensor,
    tokens: torch.Tensor,
    old_tokens: torch.Tensor | None = None,
    teacher_out: CIGNOutput | None = None,
    old_classes: Sequence[int] = (),
    new_classes: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """L = L_ctl + L_group (eq 10) as named terms `bce`, `kl`, `ce`, `ctl` and their sum `total`.

    L_group (eq 8) = kl + ce + bce; L_ctl (eq 9) = ctl, audio plus visual. cfg.use_avctd = False drops
    kl and ce, cfg.use_avcg = False drops ctl (Table 4). kl needs old_tokens and ctl needs teacher_out
    (the previous task's model on the same batch); terms that do not apply are 0. Where eq 9 applies,
    ``diag/ctl_<stat>_<a|v>`` keys add its ``contrast_stats`` per modality (diagnostics, not losses).
    """
    zero = out.logits_a.new_zeros(())
    bce = grouping_bce(out.logits_a, out.logits_v, labels)
    kl = token_distillation(tokens, old_tokens) if cfg.use_avctd and old_tokens is not None else zero
    ce = token_independence(token_logits, new_classes) if cfg.use_avctd and len(new_classes) else zero
    ctl, diag = zero, {}
    if cfg.use_avcg and teacher_out is not None:
        for m, g_old, g_new in (("a", teacher_out.g_a, out.g_a), ("v", teacher_out.g_v, out.g_v)):
            parts = _contrast(g_old, g_new, labels, old_classes)  # once for the loss and its diagnostics
            ctl = ctl + _eq9(parts, g_new, cfg.tau, cfg.ctl_denominator)
            diag |= {f"diag/ctl_{k}_{m}": v for k, v in _stats(parts, cfg.tau).items()}
    return {"bce": bce, "kl": kl, "ce": ce, "ctl": ctl, "total": bce + kl + ce + ctl, **diag}
