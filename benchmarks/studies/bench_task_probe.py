"""Question: why does CIGN's 10-task avdigits run lose its visual branch?
Answer: its one-class first task leaves both heads flat (eq 8's BCE is minimised by a constant) and the
visual head stays flat on the seeds that lose it. Results: ``benchmarks/studies/results/task_probe_avdigits.json``.

What each task's model separates, per modality.

avdigits in 10 tasks gives one class per task, so the first task is a one-class problem. For the
runs of ``cign-experiment tasks`` (``cign+tasks=10``) and, for comparison, the default 5-task runs
(``cign``), each task checkpoint is read and, on the val clips of all ten classes, two things are
measured per modality: the spread of the heads' logits (std over clips and seen classes: a head that
gives every clip the same score has spread 0) and a nearest-class-mean probe of the encoder features
(``CIGN.encoder_features``, unit class means of 60 train clips per class -> val accuracy over the ten
classes; chance 10 %), per seed (the seeds differ: ``benchmarks/studies/README.md``). Writes
``benchmarks/studies/results/task_probe_avdigits.json`` with the CPU named.
"""
from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cign_train import checkpoint as ck
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine as bench_machine  # noqa: E402

RUNS = {"10 tasks x 1 class": "cign+tasks=10", "5 tasks x 2 classes": "cign"}
MODALITIES = ("audio", "visual")


@torch.no_grad()
def outputs(model, batches) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(encoder features per modality, head logits per modality, labels) over ``batches``."""
    feats, logits, labels = ([], []), ([], []), []
    for x in batches():
        out = model(x.spectrograms, x.frames)
        pairs = ((feats, model.encoder_features(x.spectrograms, x.frames)), (logits, (out.logits_a, out.logits_v)))
        for store, values in pairs:
            for m in range(2):
                store[m].append(values[m].float())
        labels.append(x.labels)
    return [torch.cat(f) for f in feats], [torch.cat(g) for g in logits], torch.cat(labels)


def probe(run: Path, train_per_class: int) -> list[dict[str, float]]:
    """Per task checkpoint of ``run``: logit spread and nearest-class-mean accuracy (%), per modality."""
    s = TrainSettings.from_dict(json.loads((run / "config.json").read_text()))
    trainer = Trainer(s, run, progress=False)
    classes = tuple(range(len(trainer.plan.order)))
    rng = np.random.default_rng(0)
    train = np.sort(np.concatenate([rng.choice(trainer.plan.split_indices("train", (c,)), train_per_class, replace=False)
                                    for c in classes]))
    val = trainer.plan.split_indices("val", classes)
    rows = []
    for t in range(ck.last_finished_task(run, len(trainer.plan.task_classes)) + 1):
        model = ck.TaskCheckpoint.load(ck.task_path(run, t)).build_model()
        train_f, _, train_y = outputs(model, trainer.batches(train))
        val_f, val_logits, val_y = outputs(model, trainer.batches(val))
        row = {}
        for m, name in enumerate(MODALITIES):
            means = F.normalize(torch.stack([F.normalize(train_f[m][train_y == c], dim=-1).mean(0) for c in classes]), dim=-1)
            nearest = (F.normalize(val_f[m], dim=-1) @ means.T).argmax(dim=1)
            row[f"ncm_{name}"] = 100 * (nearest == val_y).float().mean().item()
            row[f"logit_spread_{name}"] = val_logits[m].std().item()
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/experiments/avdigits-cpu"), help="RUN-seedS folders")
    ap.add_argument("--train-per-class", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {label: {seed: probe(args.runs / f"{name}-seed{seed}", args.train_per_class) for seed in args.seeds}
               for label, name in RUNS.items()}
    machine = bench_machine.describe()
    print(f"per task checkpoint, val clips of all 10 classes, per seed; {bench_machine.label(machine)}")
    keys = list(results[next(iter(RUNS))][args.seeds[0]][0])
    print("| run | seed | after task | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 3))
    for label, per_seed in results.items():
        for seed, rows in per_seed.items():
            for t, row in enumerate(rows):
                print(f"| {label} | {seed} | {t + 1} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    out = Path(__file__).parent / "results" / "task_probe_avdigits.json"
    out.write_text(json.dumps({"machine": machine, "split": "val", "runs": RUNS, "train_per_class": args.train_per_class,
                               "per_seed_per_task": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
