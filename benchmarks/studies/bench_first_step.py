"""Question: what do eqs 8-9 see at the first step of an incremental task, before any update, under each reading?
Answer: the table-token KL is exactly 0 (the table is copied), the contextual one is not; ``label`` negatives
let token identity rank the positive first, ``maxpool`` ones do not. Results: ``benchmarks/studies/results/first_step_avdigits.json``.

The teacher is a trained task-1 model (``task_0.pt`` of the default CIGN runs of ``cign-experiment
readings``, one per seed); the student is that model grown by task 2's classes. On real task-2 training batches (the new
clips plus the run's buffer exemplars, class-balanced and augmented as in training) it measures, per
teacher BatchNorm mode (``batch`` / ``running``): eq 9's anchor-positive cosine, mean (max-pooled)
anchor-negative cosine and the positive's softmax share p_pos at tau, for ``label`` and ``maxpool``
negatives, and for ``maxpool`` how often the max lands on the anchor's own class slot; eq 8's KL on the token table and on the contextualised tokens; the cosine of the old
classes' contextualised tokens, student vs teacher. Mean over 8 batches, then mean +- std over the
seeds. Writes ``benchmarks/studies/results/first_step_avdigits.json`` with the CPU named.
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cign_train import checkpoint as ck
from cign_train.config import CTL_NEGATIVES, TEACHER_BN
from cign_train.data.loader import batch_loader
from cign_train.losses import contrast_stats, token_distillation
from cign_train.methods.cign import CignMethod
from cign_train.settings import preset_settings
from cign_train.trainer import Trainer, train_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine as bench_machine  # noqa: E402


@torch.no_grad()
def probe(run: Path, seed: int, teacher_bn: str, batches: int, data_dir: str) -> dict[str, float]:
    s = preset_settings("cpu", seed=seed, eval_split="val", data_dir=data_dir)
    trainer = Trainer(s, run / "probe-unused", progress=False)
    saved = ck.TaskCheckpoint.load(run / "task_0.pt")
    trainer.buffer.load_state_dict(saved.buffer)
    task = trainer.task(1)
    idx = np.union1d(train_indices(trainer.plan, task.new_classes, None, seed), trainer.buffer.indices)
    cfg = dataclasses.replace(s.model, teacher_bn=teacher_bn)
    model = trainer.build_model(len(saved.classes))
    model.load_state_dict(saved.model)
    method = CignMethod(model, cfg)
    method.task = task
    method.begin_task(task)
    model.grow(len(task.new_classes))
    model.train()
    sums: dict[str, list[float]] = {}
    loader = batch_loader(trainer.plan.store, idx, s.batch_size, shuffle=True, workers=0, seed=seed,
                          weights=trainer.class_balance(idx))
    for i, batch in enumerate(loader):
        if i == batches:
            break
        x = trainer.inputs(batch, augment=True)
        with trainer.autocast():
            out, t = model(x.spectrograms, x.frames), method.teacher_features(x)
        values = {"kl_table": token_distillation(model.tokens, method.teacher.tokens),
                  "kl_contextual": token_distillation(out.c_a, t.c_a) + token_distillation(out.c_v, t.c_v)}
        for m, g_old, g_new, c_new, c_old in (("a", t.g_a, out.g_a, out.c_a, t.c_a), ("v", t.g_v, out.g_v, out.c_v, t.c_v)):
            for negatives in CTL_NEGATIVES:
                for k, v in contrast_stats(g_old, g_new, x.labels, task.old_classes, cfg.tau, negatives).items():
                    values[f"{negatives}_{k}_{m}"] = v
            values[f"c_hat_cos_{m}"] = F.cosine_similarity(c_new[:, : c_old.shape[1]].float(), c_old.float(), dim=-1).mean()
        for k, v in values.items():
            sums.setdefault(k, []).append(float(v))
    return {k: statistics.fmean(v) for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/experiments/avdigits-cpu"), help="cign-seedS run folders")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = {}
    for bn in TEACHER_BN:
        per_seed = [probe(args.runs / f"cign-seed{seed}", seed, bn, args.batches, args.data_dir) for seed in args.seeds]
        table[bn] = {k: (statistics.fmean(r[k] for r in per_seed), statistics.stdev(r[k] for r in per_seed))
                     for k in per_seed[0]}
    machine = bench_machine.describe()
    print(f"task 2's first step, before any update, seeds {args.seeds}, {args.batches} batches each: "
          f"mean +- std; {bench_machine.label(machine)}")
    print(f"{'quantity':<24}" + "".join(f"{'teacher BN ' + bn:>24}" for bn in table))
    for k in table[TEACHER_BN[0]]:
        print(f"{k:<24}" + "".join(f"{table[bn][k][0]:>15.4f} +- {table[bn][k][1]:<6.4f}" for bn in table))
    out = Path(__file__).parent / "results" / "first_step_avdigits.json"
    out.write_text(json.dumps({"machine": machine, "seeds": args.seeds, "batches": args.batches, "split": "train",
                               "teacher_bn": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
