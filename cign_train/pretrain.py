"""Self-supervised audio-visual pretraining of CIGN's two encoders (``cign-pretrain``).

The paper starts both encoders from self-supervised audio-visual pretraining (Sec. 4.1). This
mirrors that protocol with the audio-visual correspondence objective of the localisation
checkpoints it uses (EZ-VSL, SLAVC), in its global form: each clip's audio and frame are embedded
(backbone -> mean over locations -> linear projection -> L2 norm), every audio of a batch is
scored against every frame by cosine / tau, and a symmetric InfoNCE makes a clip's own pair the
most similar. Labels are never read. Both inputs get the training augmentation
(``cign_train.augment``), so the encoders cannot match clips by colour or word timing alone. Our
choice: the global (mean-pooled) form rather than EZ-VSL's max over locations, because CIGN reads a
single audio vector and the avdigits frames hold one object.

The checkpoint holds the two backbones under ``audio`` / ``visual`` (the layout
``--encoder-weights`` loads; the projection heads are dropped) and, under ``pretrain``, the
settings and the per-epoch loss and pair-retrieval accuracy.
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
from tqdm import tqdm

from cign_train import precision
from cign_train.augment import Augment
from cign_train.config import CIGNConfig
from cign_train.data.loader import batch_loader
from cign_train.data.store import PreparedStore
from cign_train.model.encoders import backbone
from cign_train.preprocess import stored_inputs


@dataclass(frozen=True)
class PretrainSettings:
    epochs: int = 20
    batch_size: int = 32  # the InfoNCE's negatives are the batch's other clips
    lr: float = 3e-4  # Adam
    tau: float = 0.07  # InfoNCE temperature
    embed_dim: int = 128  # projection width (dropped after pretraining)
    encoder: str = "resnet18"  # the backbones (CIGNConfig.encoder) of the cign-train preset that will load them
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"
    workers: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Correspondence(nn.Module):
    """Audio and visual backbones (``cfg.encoder``) with projection heads: (spectrograms, frames) -> unit embeddings."""

    def __init__(self, cfg: CIGNConfig, embed_dim: int = 128):
        super().__init__()
        self.audio = backbone(cfg, "audio")
        self.visual = backbone(cfg, "visual")
        self.head_a = nn.Linear(self.audio.out_channels, embed_dim)
        self.head_v = nn.Linear(self.visual.out_channels, embed_dim)

    def forward(self, spectrograms: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.audio(spectrograms.unsqueeze(1)).mean(dim=(2, 3))
        v = self.visual(frames).mean(dim=(2, 3))
        return F.normalize(self.head_a(a.float()), dim=-1), F.normalize(self.head_v(v.float()), dim=-1)


def infonce(a: torch.Tensor, v: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetric InfoNCE of matching rows of ``a`` and ``v``, fraction of rows whose own pair scores highest)."""
    logits = a @ v.T / tau
    target = torch.arange(len(a), device=a.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, (logits.argmax(dim=1) == target).float().mean()


def _inputs(store: PreparedStore, batch, device: torch.device, augment: Augment | None):
    return stored_inputs(store.spec, batch.frames, batch.spectrograms, device, augment)


@torch.no_grad()
def evaluate(model: Correspondence, store: PreparedStore, idx: np.ndarray, s: PretrainSettings,
             device: torch.device) -> dict[str, float]:
    """Mean InfoNCE and pair-retrieval accuracy over batches of ``idx`` (no augmentation)."""
    model.eval()
    losses, accs = [], []
    for batch in batch_loader(store, idx, s.batch_size, shuffle=False, workers=0):
        if len(batch.labels) < 2:
            continue
        loss, acc = infonce(*model(*_inputs(store, batch, device, None)), s.tau)
        losses.append(float(loss))
        accs.append(float(acc))
    return {"loss": float(np.mean(losses)), "retrieval": float(np.mean(accs))}


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
    model = Correspondence(CIGNConfig(encoder=s.encoder), embed_dim=s.embed_dim).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    augment = Augment(store.spec)
    dtype = precision.autocast_dtype(s.amp, device)
    history = {"epoch": [], "train_loss": [], "val_loss": [], "val_retrieval": [], "seconds": []}
    started = time.perf_counter()
    for epoch in range(s.epochs):
        model.train()
        loader = batch_loader(store, train, s.batch_size, shuffle=True, workers=s.workers, seed=s.seed * 7919 + epoch,
                              drop_last=True)
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{s.epochs}", leave=False, disable=not progress)
        losses = []
        for batch in bar:
            with precision.autocast(device, dtype):
                loss, _ = infonce(*model(*_inputs(store, batch, device, augment)), s.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        held_out = evaluate(model, store, val, s, device) if len(val) >= 2 else {"loss": float("nan"), "retrieval": float("nan")}
        for key, value in (("epoch", epoch + 1), ("train_loss", float(np.mean(losses))), ("val_loss", held_out["loss"]),
                           ("val_retrieval", held_out["retrieval"]), ("seconds", time.perf_counter() - started)):
            history[key].append(value)
        save(out, model, s, store, history)  # every epoch: an interrupted run keeps its latest encoders
        if progress:
            tqdm.write(f"pretrain epoch {epoch + 1}/{s.epochs}: train InfoNCE {history['train_loss'][-1]:.3f}, "
                       f"val InfoNCE {held_out['loss']:.3f}, val pair retrieval {100 * held_out['retrieval']:.1f} % "
                       f"(chance {100 / s.batch_size:.1f} %)")
    return history
