"""CIGN objectives (paper Sec. 3.2-3.3): L = L_ctl + L_group (eq 10).

Pure functions of model outputs and labels; the model's forward never sees labels. Class indices
are global: the K classes seen so far, old classes first, match the rows of the token table.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cign_train.config import CIGNConfig
from cign_train.model import CIGNOutput


def token_distribution(tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log of the distribution of each token over its D features: log softmax(sqrt(D) c / ||c||_2 / T).

    The paper does not say how a token c_i (1 x D) becomes a distribution. A softmax of the raw
    token is nearly uniform (tokens start at std 0.02 and stay small), which leaves eq 8's KL at
    ~1e-5 with no grip. We first rescale each token to unit RMS (c / ||c|| * sqrt(D)), so its
    logits have unit spread whatever its norm: the KL then keeps each old token's feature profile
    (its direction), while its length stays free. The KL is then a cosine distillation with an
    implicit scale: for a pair of tokens at cosine s it is about (1 - s) / T^2 (random pairs at D =
    256: 0.010 / 0.029 / 0.099 at s = 0.99 / 0.97 / 0.90 and T = 1; tested). T (``kl_temperature``)
    divides the logits, so it sets the term's weight: T = 0.5 makes it 4 times stronger, T = 2 4
    times weaker.
    """
    unit_rms = F.normalize(tokens, dim=-1) * tokens.shape[-1] ** 0.5  # (K, D)
    return F.log_softmax(unit_rms / temperature, dim=-1)


def token_distillation(tokens: torch.Tensor, old_tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """sum_{i <= C} KL(c^t_i || c^{t-1}_i), eq 8's first term, over token_distribution; mean over samples.

    tokens (..., K, D) are the current model's, old_tokens (..., C, D) the previous task's (a teacher:
    no gradient). Either the table (K, D) (``token_source`` ``table``, literal) or the contextualised
    tokens (B, K, D) of one modality, student and teacher on the same inputs (``contextual``): the
    table is copied into the student by ``grow()``, so its KL is exactly 0 when a task starts and only
    reaches the table; the contextualised tokens differ at once (the new tokens join the attention of
    eqs 1-2) and carry the KL into phi and the encoders. KL(p || q) = sum_d p (log p - log q), in fp32,
    both distributions at ``temperature``.
    """
    log_p = token_distribution(tokens[..., : old_tokens.shape[-2], :].float(), temperature)  # (..., C, D)
    log_q = token_distribution(old_tokens.detach().float(), temperature)  # (..., C, D)
    return (log_p.exp() * (log_p - log_q)).sum(dim=(-2, -1)).mean()


def token_independence(token_logits: torch.Tensor, new_classes: Sequence[int]) -> torch.Tensor:
    """sum_{i new} CE(h_i, e_i) with e_i = softmax(FC(c_i)) and h_i one-hot at i, eq 8's second term.

    token_logits (..., K, K) is FC(c_i) for every token: of the table (K, K) or of one modality's
    contextualised tokens (B, K, K) (CIGN.token_logits); each new token must classify as its own
    class. Summed over the new tokens, mean over samples.
    """
    idx = torch.as_tensor(list(new_classes), dtype=torch.long, device=token_logits.device)
    logits = token_logits[..., idx, :]  # (..., N, K)
    target = idx.expand(logits.shape[:-1])  # (..., N)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           reduction="sum") * len(idx) / target.numel()


def grouping_bce(logits_a: torch.Tensor, logits_v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_i BCE(y_i, p_a,i) + BCE(y_i, p_v,i) over all K seen classes, eq 8's last term; batch mean.

    logits (B, K) are FC(g_i) before the sigmoid, labels (B,) class indices (y one-hot).
    """
    y = F.one_hot(labels, logits_a.shape[1]).to(logits_a.dtype)  # (B, K)
    bce_a = F.binary_cross_entropy_with_logits(logits_a, y, reduction="none").sum(dim=1)  # (B,)
    bce_v = F.binary_cross_entropy_with_logits(logits_v, y, reduction="none").sum(dim=1)  # (B,)
    return (bce_a + bce_v).mean()


class _Contrast(NamedTuple):
    """Eq 9's unit vectors in fp32 and the anchors' classes."""

    anchor: torch.Tensor  # (N, D) g_old[n, y_n] over the old-class samples n
    pos: torch.Tensor  # (N, D) g_new[n, y_n]
    neg: torch.Tensor  # over the new-class samples m: (M, D) g_new[m, y_m] (label), (M, K, D) g_new[m] (maxpool)
    classes: torch.Tensor  # (N,) y_n


def _contrast(g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int],
              negatives: str = "maxpool") -> _Contrast | None:
    """Eq 9's anchors, positives and negatives (``_Contrast``); None when the batch lacks old or new samples."""
    old = torch.isin(labels, torch.as_tensor(list(old_classes), dtype=labels.dtype, device=labels.device))
    if not old.any() or old.all():
        return None
    rows = torch.arange(labels.shape[0], device=labels.device)
    anchor = F.normalize(g_old.detach()[rows[old], labels[old]].float(), dim=-1)
    pos = F.normalize(g_new[rows[old], labels[old]].float(), dim=-1)
    neg = g_new[rows[~old], labels[~old]] if negatives == "label" else g_new[~old]
    return _Contrast(anchor, pos, F.normalize(neg.float(), dim=-1), labels[old])


def _similarities(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cosine of each anchor with its positive (N,) and with each negative sample (N, M); a negative
    given by all its class slots (M, K, D) counts with its most similar slot (max-pooling), whose
    index (N, M) comes third (None for single-slot negatives)."""
    anchor, pos, neg, _ = parts
    sim_pos = (anchor * pos).sum(dim=-1)  # (N,)
    if neg.dim() == 2:
        return sim_pos, anchor @ neg.T, None  # (N, M)
    sim_neg, slot = torch.einsum("nd,mkd->nmk", anchor, neg).max(dim=-1)  # (N, M, K) -> (N, M)
    return sim_pos, sim_neg, slot


def continual_grouping(
    g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int], tau: float,
    denominator: str = "infonce", negatives: str = "maxpool",
) -> torch.Tensor:
    """One modality's term of L_ctl (eq 9), computed in fp32 (autocast off).

    g_old (B, C, D) comes from the frozen previous model (teacher, no gradient), g_new (B, K, D) from
    the current model on the same inputs; labels (B,). Each sample n whose label is an old class
    (from the rehearsal buffer) is an anchor g_old[n, y_n], with positive g_new[n, y_n]; the negatives
    are the batch's new-class samples m. sim is the cosine similarity over tau (0.07 by default: the
    paper gives no value).

    ``negatives``: the paper computes the old-new similarities "by max-pooling" the cosine
    similarities of the class-aware features. ``maxpool`` (default) reads it as the max over the new
    sample's K class slots, which includes the anchor's own slot: the negative then shares the
    anchor's class token, so only the sample's content can rank the positive first. ``label`` takes
    the negative at its ground-truth class, y_m != y_n: the class tokens dominate g_i (eq 7's c_hat_i
    residual), so token identity alone ranked the positive first (p_pos median 0.999, docs/paper-choices.md).

    ``denominator``: ``paper`` sums only the negatives, as eq 9 is written: -sim_pos + log sum exp
    sim_neg, which with cosine similarity is bounded below by log M - 2 / tau; ``infonce`` adds the
    positive (>= 0, the form of most contrastive losses). fp32 because the InfoNCE form saturates
    near 0 once the positive dominates, where bf16 rounds it to exactly 0. Mean over anchors; a
    (differentiable) 0 when the batch lacks old or new samples.
    """
    return _eq9(_contrast(g_old, g_new, labels, old_classes, negatives), g_new, tau, denominator)


def _eq9(parts, g_new: torch.Tensor, tau: float, denominator: str) -> torch.Tensor:
    """``continual_grouping`` on ``_contrast``'s unit vectors (a differentiable 0 without them)."""
    if parts is None:
        return g_new.sum().float() * 0.0
    with torch.autocast(g_new.device.type, enabled=False):
        sim_pos, sim_neg, _ = _similarities(parts)  # (N,), (N, M)
        sim_pos, sim_neg = sim_pos / tau, sim_neg / tau
        if denominator == "paper":
            return (torch.logsumexp(sim_neg, dim=1) - sim_pos).mean()
        return (torch.logsumexp(torch.cat([sim_pos[:, None], sim_neg], dim=1), dim=1) - sim_pos).mean()


def contrast_stats(g_old: torch.Tensor, g_new: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int],
                   tau: float, negatives: str = "maxpool") -> dict[str, torch.Tensor]:
    """What eq 9 sees on a batch: mean anchor-positive cosine ``cos_pos``, mean anchor-negative cosine
    ``cos_neg`` (after max-pooling for ``maxpool``), and ``p_pos``, the mean softmax probability of the
    positive among [positive, negatives] at tau (near 1: the InfoNCE form has saturated and gives no
    gradient), and for ``maxpool`` ``own_slot``, the share of (anchor, negative) pairs whose max lands on
    the anchor's own class slot. Empty when eq 9 does not apply to the batch."""
    return _stats(_contrast(g_old, g_new, labels, old_classes, negatives), tau)


@torch.no_grad()
def _stats(parts, tau: float) -> dict[str, torch.Tensor]:
    """``contrast_stats`` on ``_contrast``'s unit vectors."""
    if parts is None:
        return {}
    parts = _Contrast(*(x.detach() for x in parts))
    sim_pos, sim_neg, slot = _similarities(parts)  # (N,), (N, M), (N, M) or None
    p_pos = torch.softmax(torch.cat([sim_pos[:, None], sim_neg], dim=1) / tau, dim=1)[:, 0]
    stats = {"cos_pos": sim_pos.mean(), "cos_neg": sim_neg.mean(), "p_pos": p_pos.mean()}
    if slot is not None:
        stats["own_slot"] = (slot == parts.classes[:, None]).float().mean()
    return stats


def cign_loss(
    out: CIGNOutput,
    labels: torch.Tensor,
    *,
    cfg: CIGNConfig,
    token_logits: Callable[[torch.Tensor | None], torch.Tensor],
    tokens: torch.Tensor,
    old_tokens: torch.Tensor | None = None,
    teacher_out: CIGNOutput | None = None,
    old_classes: Sequence[int] = (),
    new_classes: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """L = L_ctl + L_group (eq 10) as named terms `bce`, `kl`, `ce`, `ctl` and their sum `total`.

    L_group (eq 8) = kl + ce + bce; L_ctl (eq 9) = ctl, audio plus visual. cfg.use_avctd = False drops
    kl and ce, cfg.use_avcg = False drops ctl (Table 4). ``token_logits`` maps tokens to FC(c_i)
    (CIGN.token_logits; None: the table). cfg.token_source ``table`` reads eq 8's c_i as the token
    table (kl needs old_tokens, the previous task's table); ``contextual`` as each modality's
    contextualised tokens out.c_a / out.c_v (kl needs teacher_out, the previous task's model on the
    same batch), kl and ce summed over the two modalities. ctl needs teacher_out. Terms that do not
    apply are 0. Where eq 9 applies, ``diag/ctl_<stat>_<a|v>`` keys add its ``contrast_stats`` per
    modality (diagnostics, not losses).
    """
    zero = out.logits_a.new_zeros((), dtype=torch.float32)
    bce = grouping_bce(out.logits_a, out.logits_v, labels)
    kl, ce, ctl, diag = zero, zero, zero, {}
    if cfg.use_avctd and cfg.token_source == "table":
        if old_tokens is not None:
            kl = token_distillation(tokens, old_tokens, cfg.kl_temperature)
        if len(new_classes):
            ce = token_independence(token_logits(None), new_classes)
    elif cfg.use_avctd:
        for c_new, c_old in ((out.c_a, None if teacher_out is None else teacher_out.c_a),
                             (out.c_v, None if teacher_out is None else teacher_out.c_v)):
            if c_old is not None and len(old_classes):
                kl = kl + token_distillation(c_new, c_old, cfg.kl_temperature)
            if len(new_classes):
                ce = ce + token_independence(token_logits(c_new), new_classes)
    if cfg.use_avcg and teacher_out is not None:
        for m, g_old, g_new in (("a", teacher_out.g_a, out.g_a), ("v", teacher_out.g_v, out.g_v)):
            parts = _contrast(g_old, g_new, labels, old_classes, cfg.ctl_negatives)  # once for loss and diagnostics
            ctl = ctl + _eq9(parts, g_new, cfg.tau, cfg.ctl_denominator)
            diag |= {f"diag/ctl_{k}_{m}": v for k, v in _stats(parts, cfg.tau).items()}
    return {"bce": bce, "kl": kl, "ce": ce, "ctl": ctl, "total": bce + kl + ce + ctl, **diag}
