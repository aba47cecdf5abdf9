"""Self-supervised audio-visual pretraining of CIGN's two encoders (``cign-pretrain``).

The paper starts both encoders from self-supervised audio-visual pretraining (Sec. 4.1). Each
clip's audio and frame are embedded (backbone -> pooled as the preset's encoder pools ->
linear projection -> L2 norm) and one of four objectives (``PretrainSettings.objective``) trains
both encoders; labels are never read for training:

- ``infonce``: audio-visual correspondence as in the localisation checkpoints the paper uses
  (EZ-VSL, SLAVC), in its global form: every audio of a batch is scored against every frame by
  cosine / tau, and a symmetric InfoNCE makes a clip's own pair the most similar.
- ``ezvsl``: the same InfoNCE with EZ-VSL's multiple-instance score (Mo & Morgado 2022): an audio
  against a frame scores the cosine of its best-matching location of the visual feature map, so a
  small sounding object is not averaged away by the clutter around it (avdigits' digit covers a
  fraction of the frame).
- ``clusters``: cross-modal self-labelling (SeLaVi, Asano et al. 2020; the swapped prediction of
  SwAV, Caron et al. 2020): both embeddings are scored against learnable prototypes, each
  modality's scores are turned into balanced soft cluster codes by Sinkhorn-Knopp (eps 0.05, 3
  iterations), and each modality predicts the other's codes (cross-entropy, temperature tau).
  Clips of one class are not pushed apart, as InfoNCE's in-batch negatives push them.
- ``simclr``: within each modality, two augmented views of a clip are matched against the batch's
  other views (SimCLR's NT-Xent, Chen et al. 2020), the audio and visual terms averaged, plus
  ``cross`` times the cross-modal ``infonce``: the encoders first learn augmentation-invariant
  features of their own, which a cross-modal objective alone never gives them on avdigits.

None of the four learns the digits on avdigits (``docs/cign-pretrain.md``), so the ``cpu`` preset
trains its encoders from scratch.

Both inputs get the training augmentation (``cign_train.augment``), so the encoders cannot match
clips by colour or word timing alone. Each epoch reports, on the val clips, the objective and two
diagnostics that do read the labels (evaluation only): class retrieval (how often an audio's best
matching frame in its batch shows its class; ``simclr``'s val objective compares the un-augmented
clip with one augmented view) and the normalised mutual information between the
labels and the k-means clusters (scikit-learn) of the audio and of the visual embeddings.

Every training batch is whole: an epoch's short last batch is dropped (the objectives' negatives are
the batch's other clips, and no step is taken on a few clips, where oneDNN's bf16 weight-gradient
failed on some CPUs); every step goes through ``cign_train.guard`` (no update from a non-finite
gradient), and the history counts the steps it redid in fp32 or skipped, per epoch.

The checkpoint holds the two backbones under ``audio`` / ``visual`` (the layout
``--encoder-weights`` loads; the projection heads are dropped) and, under ``pretrain``, the
settings and the per-epoch history.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from tqdm import tqdm

from cign_train import precision
from cign_train.augment import Augment
from cign_train.config import CIGNConfig
from cign_train.data.loader import batch_loader
from cign_train.data.store import PreparedStore
from cign_train.guard import ACTIONS, StepGuard
from cign_train.model.encoders import backbone, pool_audio
from cign_train.preprocess import stored_inputs


OBJECTIVES = ("infonce", "ezvsl", "clusters", "simclr")


@dataclass(frozen=True)
class PretrainSettings:
    epochs: int = 20
    batch_size: int = 32  # the InfoNCE's negatives are the batch's other clips
    lr: float = 3e-4  # Adam
    objective: str = "infonce"  # one of OBJECTIVES (module docstring)
    tau: float = 0.07  # temperature of the InfoNCE / NT-Xent logits / of the cluster predictions
    cross: float = 0.0  # simclr: weight of the cross-modal InfoNCE added to the two within-modal terms
    prototypes: int = 30  # clusters: number of prototypes (over-clustering)
    embed_dim: int = 128  # projection width (dropped after pretraining)
    encoder: str = "resnet18"  # the backbones (CIGNConfig.encoder) of the cign-train preset that will load them
    audio_pool: str = "mean"  # CIGNConfig.audio_pool of that preset
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown pretraining objective {self.objective!r}; choose from {OBJECTIVES}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Correspondence(nn.Module):
    """Audio and visual backbones (``cfg.encoder``) with projection heads: (spectrograms, frames) -> unit
    embeddings, the visual one (B, E) pooled or, with ``locations``, (B, P, E) per location of the
    feature map; ``prototypes`` > 0 adds the clusters objective's prototype vectors."""

    def __init__(self, cfg: CIGNConfig, embed_dim: int = 128, prototypes: int = 0, locations: bool = False):
        super().__init__()
        self.audio = backbone(cfg, "audio")
        self.visual = backbone(cfg, "visual")
        self.audio_pool = cfg.audio_pool
        self.head_a = nn.Linear(self.audio.out_channels, embed_dim)
        self.head_v = nn.Linear(self.visual.out_channels, embed_dim)
        self.prototypes = nn.Linear(embed_dim, prototypes, bias=False) if prototypes else None
        self.locations = locations

    def forward(self, spectrograms: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = pool_audio(self.audio(spectrograms.unsqueeze(1)), self.audio_pool)
        fmap = self.visual(frames)
        v = fmap.flatten(2).transpose(1, 2) if self.locations else fmap.mean(dim=(2, 3))  # (B, P, C) or (B, C)
        return F.normalize(self.head_a(a.float()), dim=-1), F.normalize(self.head_v(v.float()), dim=-1)


def similarity(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine of every audio with every frame: with pooled (B, E) frames their dot product, with
    (B, P, E) locations the best location's (EZ-VSL's multiple-instance score, Mo & Morgado 2022)."""
    return a @ v.T if v.dim() == 2 else torch.einsum("ie,jpe->ijp", a, v).amax(dim=-1)


def pooled(v: torch.Tensor) -> torch.Tensor:
    """A clip's one visual embedding: itself, or the unit mean of its locations."""
    return v if v.dim() == 2 else F.normalize(v.mean(dim=1), dim=-1)


def infonce(a: torch.Tensor, v: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetric InfoNCE of matching rows of ``a`` and ``v``, fraction of rows whose own pair scores highest)."""
    logits = similarity(a, v) / tau
    target = torch.arange(len(a), device=a.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, (logits.argmax(dim=1) == target).float().mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """(B, K) prototype scores -> (B, K) soft codes whose rows sum to 1 and whose columns each hold
    B / K of the mass (equipartition; SwAV's Sinkhorn-Knopp, computed in fp32)."""
    q = torch.exp((scores.float() - scores.float().max()) / eps)
    q = q / q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / k  # every prototype gets 1 / K of the mass
        q = q / q.sum(dim=1, keepdim=True) / b  # every clip 1 / B
    return q * b


def swapped_prediction(a: torch.Tensor, v: torch.Tensor, prototypes: nn.Linear, tau: float) -> torch.Tensor:
    """The clusters objective: each modality predicts the other's Sinkhorn codes (SwAV eq 3, across modalities)."""
    with torch.no_grad():
        prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
    sa, sv = prototypes(a), prototypes(v)  # (B, K) cosine scores
    qa, qv = sinkhorn(sa), sinkhorn(sv)
    return -((qv * F.log_softmax(sa / tau, dim=1)).sum(1).mean() + (qa * F.log_softmax(sv / tau, dim=1)).sum(1).mean()) / 2


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq 1): each of the 2B unit embeddings is matched to its other
    view against the 2B - 2 other embeddings of the batch."""
    z = torch.cat([z1, z2])
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def objective_loss(model: Correspondence, a: torch.Tensor, v: torch.Tensor, s: PretrainSettings,
                   views: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The objective on one batch's embeddings; ``simclr`` also takes the second views' (a2, v2)."""
    if s.objective == "clusters":
        return swapped_prediction(a, v, model.prototypes, s.tau)
    if s.objective == "simclr":
        a2, v2 = views
        return (nt_xent(a, a2, s.tau) + nt_xent(v, v2, s.tau)) / 2 + s.cross * infonce(a, v, s.tau)[0]
    return infonce(a, v, s.tau)[0]


def _inputs(store: PreparedStore, batch, device: torch.device, augment: Augment | None):
    return stored_inputs(store.spec, batch.frames, batch.spectrograms, device, augment)


def batch_loss(model: Correspondence, store: PreparedStore, batch, s: PretrainSettings, device: torch.device,
               augment: Augment, first_view: Augment | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, audio, visual embeddings) of one batch, its first view augmented by ``first_view``;
    ``simclr`` embeds a second view with ``augment``."""
    a, v = model(*_inputs(store, batch, device, first_view))
    views = model(*_inputs(store, batch, device, augment)) if s.objective == "simclr" else None
    return objective_loss(model, a, v, s, views), a, v


@torch.no_grad()
def evaluate(model: Correspondence, store: PreparedStore, idx: np.ndarray, s: PretrainSettings,
             device: torch.device, augment: Augment) -> dict[str, float]:
    """On ``idx`` (no augmentation but simclr's second view, one fixed order): the mean objective and
    pair retrieval over batches, class retrieval (an audio's best frame in its batch shows its class;
    chance from the batches' class counts), and
    the NMI of the labels with k-means (k = number of classes) of the audio / visual embeddings."""
    model.eval()
    losses, pairs, hits, chance, emb_a, emb_v, labels = [], [], [], [], [], [], []
    # one fixed shuffle: a store listed class by class would otherwise give single-class batches
    for batch in batch_loader(store, idx, s.batch_size, shuffle=True, workers=0, seed=s.seed):
        if len(batch.labels) < 2:
            continue
        loss, a, v = batch_loss(model, store, batch, s, device, augment, None)
        y = torch.as_tensor(batch.labels, device=a.device)
        losses.append(float(loss))
        best = similarity(a, v).argmax(dim=1)
        pairs.append(float((best == torch.arange(len(a), device=a.device)).float().mean()))
        hits.append(float((y[best] == y).float().mean()))
        chance.append(float((y[:, None] == y[None, :]).float().mean()))
        emb_a.append(a.cpu())
        emb_v.append(pooled(v).cpu())
        labels.append(y.cpu())
    y = torch.cat(labels).numpy()
    k = len(np.unique(y))
    nmi = {name: normalized_mutual_info_score(y, KMeans(k, n_init=4, random_state=0).fit_predict(torch.cat(e).numpy()))
           for name, e in (("audio", emb_a), ("visual", emb_v))}
    return {"loss": float(np.mean(losses)), "retrieval": float(np.mean(pairs)), "class_retrieval": float(np.mean(hits)),
            "class_chance": float(np.mean(chance)), "nmi_audio": float(nmi["audio"]), "nmi_visual": float(nmi["visual"])}


def save(out: Path, model: Correspondence, s: PretrainSettings, store: PreparedStore, history: dict) -> None:
    """Write the backbones (``audio`` / ``visual``, the ``--encoder-weights`` layout) and the run's record, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"audio": {k: v.cpu() for k, v in model.audio.state_dict().items()},
                "visual": {k: v.cpu() for k, v in model.visual.state_dict().items()},
                "pretrain": {"settings": s.to_dict(), "store": str(store.root), "spec": store.spec.to_dict(),
                             "history": history}}, tmp)
    os.replace(tmp, out)


def pretrain(store: PreparedStore, s: PretrainSettings, out: Path, progress: bool = True) -> dict:
    """Train on the store's ``train`` clips, report on its ``val`` clips and write ``out`` after every epoch;
    returns the history."""
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    train, val = store.indices("train"), store.indices("val")
    if len(train) < 2 * s.batch_size:
        raise ValueError(f"{store.root}: {len(train)} training clips, need at least two batches of {s.batch_size}")
    cfg = CIGNConfig(encoder=s.encoder, audio_pool=s.audio_pool)
    prototypes = s.prototypes if s.objective == "clusters" else 0
    model = Correspondence(cfg, embed_dim=s.embed_dim, prototypes=prototypes, locations=s.objective == "ezvsl")
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    augment = Augment(store.spec)
    dtype = precision.autocast_dtype(s.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    guard = StepGuard(model, redo=dtype == torch.bfloat16)
    keys = ("loss", "retrieval", "class_retrieval", "class_chance", "nmi_audio", "nmi_visual")
    history = {"epoch": [], "train_loss": [], **{f"val_{k}": [] for k in keys}, "seconds": [],
               **{f"guard_{a}": [] for a in ACTIONS}}
    started = time.perf_counter()
    for epoch in range(s.epochs):
        model.train()
        loader = batch_loader(store, train, s.batch_size, shuffle=True, workers=s.workers, seed=s.seed * 7919 + epoch,
                              last="drop")
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{s.epochs}", leave=False, disable=not progress)
        losses = []
        for batch in bar:
            guard.capture()
            with precision.autocast(device, dtype):
                loss = batch_loss(model, store, batch, s, device, augment, augment)[0]
            guard.step(loss, lambda: batch_loss(model, store, batch, s, device, augment, augment)[0], optimizer, scaler)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        held_out = evaluate(model, store, val, s, device, augment) if len(val) >= 2 else dict.fromkeys(keys, float("nan"))
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(float(np.mean(losses)))
        for key in keys:
            history[f"val_{key}"].append(held_out[key])
        history["seconds"].append(time.perf_counter() - started)
        for a in ACTIONS:  # steps of this epoch with a non-finite gradient (cign_train.guard)
            history[f"guard_{a}"].append(guard.counts[a] - sum(history[f"guard_{a}"]))
        save(out, model, s, store, history)  # every epoch: an interrupted run keeps its latest encoders
        if progress:
            tqdm.write(f"pretrain epoch {epoch + 1}/{s.epochs}: train {s.objective} {history['train_loss'][-1]:.3f}, "
                       f"val {held_out['loss']:.3f}; val pair retrieval {100 * held_out['retrieval']:.1f} % "
                       f"(chance {100 / s.batch_size:.1f} %), class retrieval {100 * held_out['class_retrieval']:.1f} % "
                       f"(chance {100 * held_out['class_chance']:.1f} %), k-means NMI audio "
                       f"{held_out['nmi_audio']:.2f} visual {held_out['nmi_visual']:.2f}"
                       + "".join(f"; {history[f'guard_{a}'][-1]} step(s) {'redone in fp32' if a == 'fp32' else a} "
                                 "(non-finite gradient)" for a in ACTIONS if history[f"guard_{a}"][-1]))
    return history
