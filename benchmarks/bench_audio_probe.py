"""Issue 9's audio goal: what lifts the ``cpu`` preset's audio encoder, measured on avdigits' val split.

The probe: the preset's audio encoder (``cnn8``, max + mean pooling over time) and a linear head
on all ten classes, AdamW 1e-3 with the preset's warm-up + cosine schedule, the run's training
augmentation, batch 16, scored on val (test is never read), seeds 1-3. Variants:

- ``baseline``; ``ema``: an exponential moving average of the weights (``torch.optim.swa_utils``,
  decay 0.995 per step) scored instead of the last weights; ``stretch``: each training spectrogram
  resampled in time by a factor in 1/1.25-1.25 (speed perturbation); ``no-erase``: no random
  erasing; ``cmn-band`` / ``cmvn-band`` / ``cmn-clip``: each mel band's mean (and variance) over the
  clip, or the clip's mean, subtracted in the model;
- data per class, on a second avdigits generated with 320 training clips per class (same generator,
  seed and held-out voices; its own val clips): 160 clips x 8 epochs, 320 x 4 (the same steps),
  160 x 16 and 320 x 8.

Writes ``benchmarks/results/audio_probe_avdigits.json`` (per variant and seed, mean and std) with
the CPU named.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import machine
import cign_train.data.avdigits as avdigits
from cign_train.data.avdigits.config import AvdigitsConfig
from cign_train.data.ingest import prepare_dataset, store_dir
from cign_train.data.loader import batch_loader
from cign_train.experiments import mean_std
from cign_train.model.encoders import AudioEncoder
from cign_train.schedule import task_scheduler
from cign_train.settings import preset_settings
from cign_train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
#: name -> (store: "default" or "320", training clips per class or None for all, epochs, options)
VARIANTS = {
    "baseline": ("default", None, 8, {}),
    "ema": ("default", None, 8, {"ema": 0.995}),
    "stretch": ("default", None, 8, {"stretch": 1.25}),
    "no-erase": ("default", None, 8, {"erase": False}),
    "cmn-band": ("default", None, 8, {"norm": "band"}),
    "cmvn-band": ("default", None, 8, {"norm": "band-var"}),
    "cmn-clip": ("default", None, 8, {"norm": "clip"}),
    "160 x 8": ("320", 160, 8, {}),
    "320 x 4": ("320", None, 4, {}),
    "160 x 16": ("320", 160, 16, {}),
    "320 x 8": ("320", None, 8, {}),
}


class MeanNorm(nn.Module):
    """Cepstral mean (and variance) normalisation of (B, F, T) log-mel input: per band over time, or per clip."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "clip":
            return x - x.mean((-2, -1), keepdim=True)
        x = x - x.mean(-1, keepdim=True)
        return x / (x.std(-1, keepdim=True) + 1e-3) if self.how == "band-var" else x


def stretch(spectrograms: torch.Tensor, factor: float) -> torch.Tensor:
    """Each (F, T) spectrogram resampled in time by exp(U(-ln factor, ln factor)), centre-cropped or
    circularly padded back to T."""
    _, f, t = spectrograms.shape
    out = []
    for row in spectrograms:
        n = max(2, round(t * math.exp(float(torch.empty(()).uniform_(-1, 1)) * math.log(factor))))
        y = F.interpolate(row[None, None], size=(f, n), mode="bilinear", align_corners=False)[0, 0]
        out.append(y[:, (n - t) // 2:(n - t) // 2 + t] if n >= t else F.pad(y[None], (0, t - n), mode="circular")[0])
    return torch.stack(out)


def probe(data_dir: Path, per_class: int | None, epochs: int, seed: int, options: dict) -> float:
    """Val accuracy (%) of the audio probe after ``epochs``."""
    s = preset_settings("cpu", seed=seed, data_dir=str(data_dir))
    tr = Trainer(s, Path("runs/audio-probe"), progress=False)
    classes = tuple(range(10))
    train = tr.plan.split_indices("train", classes)
    if per_class:
        labels = tr.plan.label_map[tr.plan.store.labels[train]]
        train = np.sort(np.concatenate([np.sort(train[labels == k])[:per_class] for k in classes]))
    val = tr.plan.split_indices("val", classes)
    if not options.get("erase", True):
        tr.augment.erase.p = 0.0
    torch.manual_seed(seed)
    net = nn.Sequential(MeanNorm(options["norm"]) if "norm" in options else nn.Identity(), AudioEncoder(s.model),
                        nn.Linear(s.model.dim, len(classes))).to(memory_format=torch.channels_last)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(options["ema"])) if "ema" in options else None
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = task_scheduler(optimizer, "cosine", epochs * -(-len(train) // s.batch_size), s.warmup)
    for epoch in range(epochs):
        net.train()
        for batch in batch_loader(tr.plan.store, train, s.batch_size, shuffle=True, workers=0, seed=seed * 1000 + epoch):
            x = tr.inputs(batch, augment=True)
            spectrograms = stretch(x.spectrograms, options["stretch"]) if "stretch" in options else x.spectrograms
            with tr.autocast():
                loss = F.cross_entropy(net(spectrograms).float(), x.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(net)
    scored = net
    if ema is not None:  # averaged weights with the last BatchNorm statistics
        for mine, live in zip(ema.module.buffers(), net.buffers()):
            mine.copy_(live)
        scored = ema
    scored.eval()
    correct = 0
    with torch.no_grad(), tr.autocast():
        for x in tr.batches(val)():
            correct += (scored(x.spectrograms).argmax(1) == x.labels).sum().item()
    return 100 * correct / len(val)


def ensure_320(data_dir: Path) -> None:
    """avdigits with 320 training clips per class under ``data_dir`` (generated and prepared once)."""
    if (store_dir(data_dir, "avdigits", "cpu") / "index.json").is_file():
        return
    generate = avdigits.generate
    avdigits.generate = lambda root, **kw: generate(root, config=AvdigitsConfig(train_per_class=320), **kw)
    try:
        prepare_dataset("avdigits", data_dir, preset="cpu", progress=False)
    finally:
        avdigits.generate = generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--data-dir-320", type=Path, default=Path("runs/audio-probe-data320"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if any(VARIANTS[v][0] == "320" for v in args.variants):
        ensure_320(args.data_dir_320)
    rows = {}
    for name in args.variants:
        store, per_class, epochs, options = VARIANTS[name]
        data = args.data_dir if store == "default" else args.data_dir_320
        accs = [probe(data, per_class, epochs, seed, options) for seed in args.seeds]
        mean, std = mean_std(accs)
        rows[name] = {"store": store, "train_per_class": per_class or (160 if store == "default" else 320),
                      "epochs": epochs, "options": options, "val_accuracy": accs, "mean": mean, "std": std}
        print(f"{name:<10} val {mean:.1f} +- {std:.1f}  ({' / '.join(f'{a:.1f}' for a in accs)})", flush=True)
    info = machine.describe()
    doc = {"machine": info, "split": "val", "seeds": args.seeds, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audio_probe_avdigits.json").write_text(json.dumps(doc, indent=1))
    print(f"{machine.label(info)}; wrote {RESULTS / 'audio_probe_avdigits.json'}")


if __name__ == "__main__":
    main()
