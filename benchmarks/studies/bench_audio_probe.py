"""Question: what lifts the ``cpu`` preset's audio encoder on avdigits (an audio-only probe, val split)?
Answer: the input band: 16 kHz audio beats 8 kHz on every seed and became the preset's spec; CIGN's BCE
head and more epochs help a little; regularisers, mixing, more data at equal steps and the stem do not pay.
Results: ``benchmarks/studies/results/audio_probe_{avdigits,band_avdigits,16k_avdigits,mix_stem_avdigits}.json``.

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
  160 x 16 and 320 x 8;
- the spectrogram's band, each on a store prepared from the default clips with its own spec (so the
  rows do not depend on the preset's): ``8k``: the ``cpu`` preset's former spec (8 kHz, n_fft 256,
  hop 80 = 10 ms, 32 mel bands x 301 frames); ``16k``: the clips' audio at 16 kHz (0-8 kHz where 8
  kHz keeps 0-4 kHz; fricatives such as the /s/ of "six" and "seven" lie above 4 kHz), n_fft 512,
  hop 160, the same 32 x 301 shape, so the encoder's cost is unchanged (the preset's spec since);
  ``16k-40``: with 40 bands; ``22k``: the clips' own 22,050 Hz (0-11 kHz) with the paper's STFT
  (n_fft 512, hop 221), 32 bands x 300 frames; ``8k smooth``: label smoothing 0.1; ``8k no-erase``
  and ``16k no-erase``: without random erasing;
- at 16 kHz: ``16k smooth``; ``16k masks``: SpecAugment's masks (two of up to 6 mel bands, two of up
  to 40 frames) instead of the erasing; ``16k mixup``: mixup (alpha 0.4); ``16k x 16``: 16 epochs;
- CIGN's head and schedule: ``16k bce``: per-class sigmoids with eq 8's BCE instead of the softmax
  (``16k bce smooth``: targets smoothed towards 1 / K); ``16k bce adam``: the trainer's Adam at 3e-4
  instead of AdamW 1e-3; ``16k bce joint``: the ``joint`` method's schedule (12 epochs on classes
  0-1, then 8 on classes 0-3, ..., 0-9, the model and its ten outputs carried over, a fresh
  optimizer and schedule per task); ``16k bce adam joint``: both; ``16k bce adam 1e-3``: Adam at 1e-3,
  ``16k bce adamw 3e-4``: AdamW at 3e-4 (which of lr and weight decay matters);
- the distractor and the stem, with the trainer's head and optimizer (``16k bce adam`` as the baseline):
  ``mixdown LOW-HIGH``: half the training clips (``all``: every one) get another (augmented) clip of
  the batch added in the power domain LOW-HIGH dB below, its word a second quieter word as avdigits' own
  distractor (3-9 dB below the target), the label the louder clip's; ``stem FxT``: the audio
  ``cnn8``'s first conv strided F in frequency and T in time instead of 2 x 2 (2 x 1 and 1 x 2
  double the encoder's FLOPs, 3 x 1 is 1.6x, 4 x 1 the same); ``stem 2x1 narrow``: 2 x 1 with a
  16-channel first stage and a 2 x 4 pool after it, back to 2 x 2's time resolution (0.86x the FLOPs);
- ``16k bce simclr`` and ``16k bce adam simclr``: the audio backbone starts from ``cign-pretrain``'s
  simclr + infonce checkpoint (``bench_pretrain.py --device cpu ... --configs simclr2x1`` writes
  ``runs/bench-pretrain-cpu/simclr2x1.pt``).

Writes ``--output`` (default ``benchmarks/studies/results/audio_probe_avdigits.json``: per variant and seed,
mean and std, the store's spec) with the CPU named. The committed ``audio_probe_avdigits.json`` was
measured while the preset was 8 kHz (its ``default`` store); ``audio_probe_band_avdigits.json`` holds
the band rows (``--variants 8k 16k 16k-40 22k "8k smooth" "8k no-erase" "16k no-erase" --seeds 1 2 3
4 5``), ``audio_probe_16k_avdigits.json`` the 16 kHz, head and schedule rows (seeds 1-5),
``audio_probe_mix_stem_avdigits.json`` the mixdown and stem rows with their baseline (seeds 1-8;
``--merge`` adds a run's rows to an existing ``--output``).
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import Conv2dNormActivation

import cign_train.data.avdigits as avdigits
from cign_runtime.spec import PRESETS as spec_presets
from cign_runtime.spec import PreprocessSpec
from cign_train.data.avdigits.config import AvdigitsConfig
from cign_train.data.ingest import prepare_dataset, store_dir
from cign_train.data.loader import batch_loader
from cign_train.experiments import mean_std
from cign_train.model.encoders import AudioEncoder
from cign_train.schedule import task_scheduler
from cign_train.settings import preset_settings
from cign_train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: spectrogram stores: name -> fields of the ``cpu`` spec that differ, prepared from the default clips
SPECS = {
    "8k": {"sample_rate": 8000, "n_fft": 256, "win_length": 256, "hop_length": 80},
    "16k": {"sample_rate": 16000, "n_fft": 512, "win_length": 512, "hop_length": 160},
    "16k-40": {"sample_rate": 16000, "n_fft": 512, "win_length": 512, "hop_length": 160, "n_mels": 40},
    "22k": {"sample_rate": 22050, "n_fft": 512, "win_length": 512, "hop_length": 221},
}
#: name -> (store: "default", "320" or a SPECS key, training clips per class or None for all, epochs, options)
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
    "8k": ("8k", None, 8, {}),
    "16k": ("16k", None, 8, {}),
    "16k-40": ("16k-40", None, 8, {}),
    "22k": ("22k", None, 8, {}),
    "8k smooth": ("8k", None, 8, {"smooth": 0.1}),
    "8k no-erase": ("8k", None, 8, {"erase": False}),
    "16k no-erase": ("16k", None, 8, {"erase": False}),
    "16k smooth": ("16k", None, 8, {"smooth": 0.1}),
    "16k masks": ("16k", None, 8, {"erase": False, "masks": (2, 6, 2, 40)}),
    "16k mixup": ("16k", None, 8, {"mixup": 0.4}),
    "16k x 16": ("16k", None, 16, {}),
    "16k bce": ("16k", None, 8, {"bce": True}),
    "16k bce smooth": ("16k", None, 8, {"bce": True, "smooth": 0.1}),
    "16k bce adam": ("16k", None, 8, {"bce": True, "adam": 3e-4}),
    "16k bce joint": ("16k", None, 8, {"bce": True, "joint": True}),
    "16k bce adam joint": ("16k", None, 8, {"bce": True, "adam": 3e-4, "joint": True}),
    "16k bce adam 1e-3": ("16k", None, 8, {"bce": True, "adam": 1e-3}),
    "16k bce adamw 3e-4": ("16k", None, 8, {"bce": True, "adamw": 3e-4}),
    "16k bce adam simclr": ("16k", None, 8, {"bce": True, "adam": 3e-4, "init": "runs/bench-pretrain-cpu/simclr2x1.pt"}),
    "16k bce simclr": ("16k", None, 8, {"bce": True, "init": "runs/bench-pretrain-cpu/simclr2x1.pt"}),
    "16k bce adam mixdown 3-12": ("16k", None, 8, {"bce": True, "adam": 3e-4, "mixdown": (3.0, 12.0, 0.5)}),
    "16k bce adam mixdown 3-12 all": ("16k", None, 8, {"bce": True, "adam": 3e-4, "mixdown": (3.0, 12.0, 1.0)}),
    "16k bce adam mixdown 3-9": ("16k", None, 8, {"bce": True, "adam": 3e-4, "mixdown": (3.0, 9.0, 0.5)}),
    "16k bce adam mixdown 0-9": ("16k", None, 8, {"bce": True, "adam": 3e-4, "mixdown": (0.0, 9.0, 0.5)}),
    "16k bce adam stem 1x2": ("16k", None, 8, {"bce": True, "adam": 3e-4, "stem": (1, 2)}),
    "16k bce adam stem 2x1": ("16k", None, 8, {"bce": True, "adam": 3e-4, "stem": (2, 1)}),
    "16k bce adam stem 4x1": ("16k", None, 8, {"bce": True, "adam": 3e-4, "stem": (4, 1)}),
    "16k bce adam stem 3x1": ("16k", None, 8, {"bce": True, "adam": 3e-4, "stem": (3, 1)}),
    "16k bce adam stem 2x1 narrow": ("16k", None, 8, {"bce": True, "adam": 3e-4, "stem": (2, 1), "narrow": True}),
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


def masks(spectrograms: torch.Tensor, n_freq: int, width_freq: int, n_time: int, width_time: int) -> torch.Tensor:
    """SpecAugment's masks (Park et al. 2019) on normalised (B, F, T) input: per sample ``n_freq`` bands of
    U{0..width_freq} mel bins and ``n_time`` spans of U{0..width_time} frames set to 0 (the normalised mean)."""
    b, f, t = spectrograms.shape
    keep = torch.ones_like(spectrograms, dtype=torch.bool)
    for n, width, size, dim in ((n_freq, width_freq, f, 1), (n_time, width_time, t, 2)):
        pos = torch.arange(size, device=spectrograms.device)
        for _ in range(n):
            w = torch.randint(0, width + 1, (b, 1))
            start = (torch.rand(b, 1) * (size - w + 1)).long()
            hit = (pos >= start) & (pos < start + w)  # (B, size)
            keep &= ~(hit.unsqueeze(2) if dim == 1 else hit.unsqueeze(1))
    return spectrograms * keep


def mixdown(spectrograms: torch.Tensor, spec: PreprocessSpec, low_db: float, high_db: float, p: float) -> torch.Tensor:
    """With probability ``p`` per sample, another clip of the batch added in the power domain ``low_db``-
    ``high_db`` dB below (its word a quieter second word; the label stays the louder clip's)."""
    b = spectrograms.shape[0]
    logp = spectrograms.float() * spec.spec_std + spec.spec_mean  # ln power of each mel band
    down = torch.empty(b, 1, 1).uniform_(low_db, high_db) * (math.log(10) / 10)
    other = torch.randperm(b)
    mixed = torch.logaddexp(logp, logp[other] - down)
    use = (torch.rand(b, 1, 1) < p)
    return torch.where(use, (mixed - spec.spec_mean) / spec.spec_std, spectrograms)


def probe(data_dir: Path, per_class: int | None, epochs: int, seed: int, options: dict) -> tuple[float, dict]:
    """Val accuracy (%) of the audio probe after ``epochs``, and the store's spec."""
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
    if "narrow" in options:  # a 16-channel first stage, then a 2 x 4 pool back to 2 x 2's time resolution
        first = nn.Sequential(Conv2dNormActivation(1, 16, 3, inplace=True), Conv2dNormActivation(16, 16, 3, inplace=True),
                              nn.MaxPool2d((2, 4), ceil_mode=True), Conv2dNormActivation(16, 64, 3, inplace=True))
        net[1].backbone = nn.Sequential(*first, *list(net[1].backbone)[4:])
        net[1].backbone.out_channels = net[1].proj.in_features
    if "stem" in options:  # the first conv's (frequency, time) stride instead of 2 x 2
        net[1].backbone[0][0].stride = options["stem"]
    if "init" in options:  # a cign-pretrain checkpoint's audio backbone
        net[1].backbone.load_state_dict(torch.load(options["init"], weights_only=True)["audio"])
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(options["ema"])) if "ema" in options else None
    stages = [(train, epochs)]
    if options.get("joint"):  # the joint method's schedule: each task adds two classes, the model carries over
        labels = tr.plan.label_map[tr.plan.store.labels[train]]
        stages = [(train[labels < 2 * (t + 1)], s.first_task_epochs if t == 0 else s.epochs) for t in range(5)]
    for stage, (clips, stage_epochs) in enumerate(stages):
        _train(tr, net, ema, clips, stage_epochs, seed * 1000 + 100 * stage, options)
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
    return 100 * correct / len(val), tr.spec.to_dict()


def _train(tr: Trainer, net: nn.Module, ema: AveragedModel | None, train: np.ndarray, epochs: int, seed: int,
           options: dict) -> None:
    """``epochs`` over ``train`` with a fresh optimizer (AdamW at ``options["adamw"]``, 1e-3, weight decay
    0.01; or Adam at ``options["adam"]``, as the trainer's) and warm-up + cosine schedule."""
    s = tr.s
    if "adam" in options:
        optimizer = torch.optim.Adam(net.parameters(), lr=options["adam"])
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=options.get("adamw", 1e-3))
    scheduler = task_scheduler(optimizer, "cosine", epochs * -(-len(train) // s.batch_size), s.warmup)
    for epoch in range(epochs):
        net.train()
        for batch in batch_loader(tr.plan.store, train, s.batch_size, shuffle=True, workers=0, seed=seed + epoch):
            x = tr.inputs(batch, augment=True)
            spectrograms = stretch(x.spectrograms, options["stretch"]) if "stretch" in options else x.spectrograms
            if "mixdown" in options:
                spectrograms = mixdown(spectrograms, tr.spec, *options["mixdown"])
            if "masks" in options:
                spectrograms = masks(spectrograms, *options["masks"])
            lam, other = 1.0, torch.arange(len(x.labels))
            if "mixup" in options:  # Zhang et al. 2018: convex pairs of inputs, the loss mixed alike
                lam = float(torch.distributions.Beta(options["mixup"], options["mixup"]).sample())
                other = torch.randperm(len(x.labels))
                spectrograms = lam * spectrograms + (1 - lam) * spectrograms[other]
            with tr.autocast():
                logits = net(spectrograms).float()
                smooth = options.get("smooth", 0.0)
                if options.get("bce"):  # CIGN's per-class sigmoid head (eq 8), the targets smoothed towards 1 / K
                    k = logits.shape[1]
                    y = F.one_hot(x.labels, k).float() * (1 - smooth) + smooth / k
                    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1).mean()
                else:
                    loss = lam * F.cross_entropy(logits, x.labels, label_smoothing=smooth)
                if lam < 1.0:
                    loss = loss + (1 - lam) * F.cross_entropy(logits, x.labels[other], label_smoothing=smooth)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(net)


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


def link_clips(data_dir: Path, clips_dir: Path) -> None:
    """``data_dir``/avdigits linked to ``clips_dir``'s generated avdigits, so a store of another spec
    is prepared from the same clips without generating them again."""
    root = data_dir / "avdigits"
    root.mkdir(parents=True, exist_ok=True)
    for entry in ("clips", "avdigits.json", "avdigits.csv"):
        if not (root / entry).exists():
            (root / entry).symlink_to((clips_dir / "avdigits" / entry).resolve())


def ensure_spec(data_dir: Path, clips_dir: Path, name: str) -> None:
    """A store of the default clips (``clips_dir``'s avdigits, linked) prepared with ``SPECS[name]``."""
    if (store_dir(data_dir, "avdigits", "cpu") / "index.json").is_file():
        return
    link_clips(data_dir, clips_dir)
    default = spec_presets["cpu"]
    spec_presets["cpu"] = dataclasses.replace(default, **SPECS[name])
    try:
        prepare_dataset("avdigits", data_dir, preset="cpu", progress=False)
    finally:
        spec_presets["cpu"] = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--data-dir-320", type=Path, default=Path("runs/audio-probe-data320"))
    ap.add_argument("--data-dir-specs", type=Path, default=Path("runs/audio-probe-specs"),
                    help="one store per SPECS entry under it")
    ap.add_argument("--output", type=Path, default=RESULTS / "audio_probe_avdigits.json")
    ap.add_argument("--merge", action="store_true",
                    help="add these rows to --output's (same seeds and CPU), keeping its other rows")
    args = ap.parse_args()
    info = machine.describe()
    rows = {}
    if args.merge and args.output.is_file():
        doc = json.loads(args.output.read_text())
        if doc["seeds"] != args.seeds or doc["machine"]["cpu"] != info["cpu"]:
            ap.error(f"{args.output} holds seeds {doc['seeds']} on {doc['machine']['cpu']}; "
                     f"these would be {args.seeds} on {info['cpu']}")
        rows = doc["rows"]
    torch.set_num_threads(2)
    if any(VARIANTS[v][0] == "320" for v in args.variants):
        ensure_320(args.data_dir_320)
    for store in {VARIANTS[v][0] for v in args.variants} & set(SPECS):
        ensure_spec(args.data_dir_specs / store, args.data_dir, store)
    for name in args.variants:
        store, per_class, epochs, options = VARIANTS[name]
        data = {"default": args.data_dir, "320": args.data_dir_320}.get(store, args.data_dir_specs / store)
        accs, specs = zip(*(probe(data, per_class, epochs, seed, options) for seed in args.seeds))
        mean, std = mean_std(accs)
        rows[name] = {"store": store, "spec": specs[0], "train_per_class": per_class or (320 if store == "320" else 160),
                      "epochs": epochs, "options": options, "val_accuracy": list(accs), "mean": mean, "std": std}
        print(f"{name:<10} val {mean:.1f} +- {std:.1f}  ({' / '.join(f'{a:.1f}' for a in accs)})", flush=True)
    doc = {"machine": info, "split": "val", "seeds": args.seeds, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    print(f"{machine.label(info)}; wrote {args.output}")


if __name__ == "__main__":
    main()
