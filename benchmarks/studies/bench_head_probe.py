"""Question: does a run's grouping head read all its encoders hold?
Answer: for ``joint`` nearly all of the audio (the encoder is the limit); for CIGN after the last task a
few points of audio are lost in the continual head. Results: ``benchmarks/studies/results/head_probe_avdigits.json``.

For each ``--runs``/``METHOD-seedS`` folder, the last task's checkpoint scores the val clips of all
classes twice per modality: through the model's own head (argmax of ``logits_a`` / ``logits_v``, the
accuracy the tables report) and through a logistic-regression probe (scikit-learn, standardised
features, each ``--C``) fitted on the same model's frozen encoder features (``CIGN.encoder_features``)
of every training clip, un-augmented. A probe well above the head means the head loses what the
encoder learned; a probe at the head's level means the encoder is the limit. Writes
``benchmarks/studies/results/head_probe_avdigits.json`` with the CPU named.
"""
from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench_task_probe import MODALITIES, outputs
from cign_train import checkpoint as ck
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine as bench_machine  # noqa: E402


def probe(run: Path, cs: list[float]) -> dict:
    """Head and probe val accuracy (%) per modality of ``run``'s last task checkpoint."""
    s = TrainSettings.from_dict(json.loads((run / "config.json").read_text()))
    trainer = Trainer(s, run, progress=False)
    classes = tuple(range(len(trainer.plan.order)))
    last = ck.last_finished_task(run, len(trainer.plan.task_classes))
    model = ck.TaskCheckpoint.load(ck.task_path(run, last)).build_model()
    train_f, _, train_y = outputs(model, trainer.batches(trainer.plan.split_indices("train", classes)))
    val_f, val_logits, val_y = outputs(model, trainer.batches(trainer.plan.split_indices("val", classes)))
    row = {"task": last + 1}
    for m, name in enumerate(MODALITIES):
        row[f"head_{name}"] = 100 * (val_logits[m].argmax(dim=1) == val_y).float().mean().item()
        for c in cs:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
            clf.fit(train_f[m].numpy(), train_y.numpy())
            row[f"probe_{name}_C{c:g}"] = 100 * clf.score(val_f[m].numpy(), val_y.numpy())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/experiments/avdigits-cpu"), help="METHOD-seedS folders")
    ap.add_argument("--methods", nargs="+", default=["joint", "cign"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="inverse regularisation strengths")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {m: {s: probe(args.runs / f"{m}-seed{s}", args.C) for s in args.seeds} for m in args.methods}
    machine = bench_machine.describe()
    keys = [k for k in next(iter(results[args.methods[0]].values())) if k != "task"]
    print(f"last task's checkpoint, val clips of all classes (%); {bench_machine.label(machine)}")
    print("| run | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for method, per_seed in results.items():
        for seed, row in per_seed.items():
            print(f"| {method} seed {seed} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
        print(f"| {method} mean | " + " | ".join(f"{np.mean([r[k] for r in per_seed.values()]):.1f}" for k in keys) + " |")
    out = Path(__file__).parent / "results" / "head_probe_avdigits.json"
    out.write_text(json.dumps({"machine": machine, "split": "val", "runs": str(args.runs), "C": args.C,
                               "per_method_per_seed": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
