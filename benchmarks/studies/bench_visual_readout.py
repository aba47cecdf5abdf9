"""Question: which read-out of the visual encoder learns avdigits' digits from scratch?
Answer: the max over locations; a cross-modal InfoNCE teaches as much as labels through it, but only once
the audio side knows the digits. Results: ``benchmarks/studies/results/visual_readout_avdigits.json``.

The ``cpu`` preset's ``cnn8`` visual encoder is trained from scratch on all ten classes' training
frames, with the labels and the run's own optimizer (Adam, the preset's peak lr, warm-up + cosine,
batch 16, augmentation, ``--epochs``), through a read-out that the pretraining objectives use:

- ``mean``: the feature map averaged over locations -> linear classifier (what ``infonce``,
  ``clusters`` and ``simclr`` embed; ``CIGN.encoder_features``);
- ``max``: the map's max over locations -> linear classifier;
- ``mil``: a linear classifier at every location, the best location's logit per class (the
  multiple-instance read-out of ``ezvsl``);
- ``nce_max`` / ``nce_mil``: a cross-modal InfoNCE (tau ``--tau``) with a perfect audio side (each
  clip's audio embedding is a fixed random unit vector of its class) against the max-pooled frame
  embedding / ``ezvsl``'s best-location score, scored by the nearest class vector: what an
  audio-visual objective could teach the visual encoder at best;

and, as the reference, CIGN's own read-out: ``cign-train --method joint --tasks 1`` (class tokens
grouping the frame's locations, eqs 1-2; the audio branch trains beside it) for the same epochs.
Val split, ``--seeds`` (merged into the results of earlier seeds); prints val accuracy at each
epoch's end and writes ``benchmarks/studies/results/visual_readout_avdigits.json`` with the CPU named.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cign_train.data.loader import batch_loader
from cign_train.model.encoders import backbone
from cign_train.schedule import task_scheduler
from cign_train.settings import preset_settings
from cign_train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine as bench_machine  # noqa: E402

READOUTS = ("mean", "max", "mil", "nce_max", "nce_mil")


class Readout(nn.Module):
    """The visual backbone and one read-out: frames -> (B, 10) class scores; ``nce_*``: (B, P, E) unit
    embeddings (P = 1 for ``nce_max``)."""

    def __init__(self, s, kind: str, classes: int = 10, embed: int = 128):
        super().__init__()
        self.backbone = backbone(s.model, "visual")
        self.kind = kind
        self.head = nn.Linear(self.backbone.out_channels, embed if kind.startswith("nce") else classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(frames)  # (B, C, h, w)
        if self.kind == "mean":
            return self.head(fmap.mean(dim=(2, 3)))
        if self.kind == "max":
            return self.head(fmap.amax(dim=(2, 3)))
        if self.kind == "nce_max":
            return F.normalize(self.head(fmap.amax(dim=(2, 3))).float(), dim=-1).unsqueeze(1)  # (B, 1, E)
        per_location = self.head(fmap.flatten(2).transpose(1, 2)).float()  # (B, P, out)
        return per_location.amax(dim=1) if self.kind == "mil" else F.normalize(per_location, dim=-1)


def scores(model: Readout, frames: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    out = model(frames).float()
    return torch.einsum("bpe,ke->bkp", out, protos).amax(dim=-1) if model.kind.startswith("nce") else out


def train_readout(kind: str, seed: int, epochs: int, tau: float) -> list[float]:
    s = preset_settings("cpu", seed=seed, workers=0, eval_split="val")
    trainer = Trainer(s, Path("runs/bench-visual-readout/unused"), progress=False)
    classes = tuple(range(10))
    train, val = trainer.plan.split_indices("train", classes), trainer.plan.split_indices("val", classes)
    torch.manual_seed(seed)
    model = Readout(s, kind).to(memory_format=torch.channels_last)
    protos = F.normalize(torch.randn(10, 128, generator=torch.Generator().manual_seed(seed)), dim=-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    scheduler = task_scheduler(optimizer, s.lr_schedule, epochs * -(-len(train) // s.batch_size), s.warmup)
    accuracy = []
    for epoch in range(epochs):
        model.train()
        for batch in batch_loader(trainer.plan.store, train, s.batch_size, shuffle=True, workers=0, seed=seed * 7919 + epoch):
            x = trainer.inputs(batch, augment=True)
            with trainer.autocast():
                if kind.startswith("nce"):  # InfoNCE of each frame against the batch's (class-vector) audios
                    logits = torch.einsum("ie,jpe->ijp", protos[x.labels], model(x.frames).float()).amax(dim=-1) / tau
                    target = torch.arange(len(logits))
                    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
                else:
                    loss = F.cross_entropy(model(x.frames).float(), x.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad(), trainer.autocast():
            for x in trainer.batches(val)():
                correct += int((scores(model, x.frames, protos).argmax(dim=1) == x.labels).sum())
        accuracy.append(100 * correct / len(val))
        print(f"{kind} seed {seed} epoch {epoch + 1}: val {accuracy[-1]:.1f} %", flush=True)
    return accuracy


def train_cign_readout(seed: int, epochs: int, runs: Path) -> float:
    out = runs / f"joint-tasks1-e{epochs}-seed{seed}"
    if not (out / "metrics.json").is_file():
        subprocess.run([sys.executable, "-m", "cign_train.cli.train", "--method", "joint", "--tasks", "1", "--first-task-epochs",
                        str(epochs), "--seed", str(seed), "--eval-split", "val", "--no-progress", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["final_accuracy"]["visual"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readouts", nargs="+", choices=READOUTS, default=list(READOUTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--tau", type=float, default=0.2, help="the nce read-outs' temperature")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-visual-readout"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(__file__).parent / "results" / "visual_readout_avdigits.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if saved and (saved["epochs"], saved["tau"]) != (args.epochs, args.tau):
        saved = {}  # other settings: start the table afresh
    results = {k: {str(s): v for s, v in per_seed.items()} for k, per_seed in saved.get("val_accuracy_per_epoch", {}).items()}
    for k in args.readouts:  # a seed run again replaces its entry; other seeds' stay
        results.setdefault(k, {}).update({str(s): train_readout(k, s, args.epochs, args.tau) for s in args.seeds})
    results.setdefault("cign_grouping", {}).update({str(s): [train_cign_readout(s, args.epochs, args.runs)] for s in args.seeds})
    seeds = sorted({s for per_seed in results.values() for s in per_seed}, key=int)
    machine = bench_machine.describe()
    print(f"visual val accuracy after {args.epochs} epochs, all 10 classes from scratch (%); {bench_machine.label(machine)}")
    print("| read-out | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |\n|" + " --- |" * (len(seeds) + 2))
    for kind, per_seed in results.items():
        last = [per_seed[s][-1] for s in seeds if s in per_seed]
        print(f"| {kind} | " + " | ".join(f"{per_seed[s][-1]:.1f}" if s in per_seed else "-" for s in seeds)
              + f" | {np.mean(last):.1f} ± {np.std(last, ddof=1) if len(last) > 1 else 0:.1f} |")
    out.write_text(json.dumps({"machine": machine, "split": "val", "epochs": args.epochs, "tau": args.tau,
                               "val_accuracy_per_epoch": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
