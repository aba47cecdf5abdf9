"""Class-incremental accuracy on avdigits: CIGN between fine-tuning (lower bound) and joint training
(upper bound), over seeds, on the val and the test split.

Runs the default ``cign-train`` procedure (``cpu`` preset, 5 tasks x 2 classes) once per method
and seed, in ``runs/bench-cil/SAMPLING/METHOD-seedS`` (a finished run is reused, an interrupted
one resumed). Each run is scored on val while it trains (``--eval-split val``: the split the
settings are chosen on), then its task checkpoints are re-scored on test for reporting
(``Trainer.rescore``). Prints mean +- std over seeds of average accuracy, final accuracy, the
diagonal (each task right after it was learned: its mean and its minimum) and the three forgetting
definitions, per modality and split. ``--rehearsal-sampling uniform`` repeats it with the
paper-literal batches (see ``Trainer.class_balance``). Writes
``benchmarks/results/cil_avdigits_SAMPLING.json`` with the CPU named.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from cign_train.checkpoint import last_finished_task
from cign_train.data.definitions import get_definition
from cign_train.settings import REHEARSAL_SAMPLING, preset_settings
from cign_train.trainer import Trainer

import machine as bench_machine

RESULTS = Path(__file__).parent / "results"
MODALITIES = ("audio_visual", "audio", "visual")


def run_one(method: str, seed: int, sampling: str, runs: Path, data_dir: str, name: str | None = None,
            model: dict | None = None) -> tuple[dict, float, bool]:
    """({split: metrics}, training seconds, whether the run was already finished and only re-read).

    ``model`` overrides fields of the preset's model config; ``name`` (default: the method) names the
    run folder ``runs/SAMPLING/NAME-seedS``."""
    run_dir = runs / sampling / f"{name or method}-seed{seed}"
    n_tasks = len(get_definition("avdigits").task_classes(None))
    finished = last_finished_task(run_dir, n_tasks) == n_tasks - 1
    settings = preset_settings("cpu", method=method, seed=seed, rehearsal_sampling=sampling, data_dir=data_dir,
                               eval_split="val")
    if model:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, **model))
    start = time.perf_counter()
    trainer = Trainer(settings, run_dir, progress=False)
    metrics = {"val": trainer.run(resume=(run_dir / "config.json").is_file())}
    seconds = time.perf_counter() - start
    metrics["test"] = Trainer(settings, run_dir, progress=False).rescore("test")
    return metrics, seconds, finished


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COLUMNS = ("average_accuracy", "average_accuracy_l2p", "final_accuracy", "diagonal_mean", "diagonal_min",
           "forgetting_avcil", "forgetting_facil", "forgetting_l2p")


def summarize_seeds(per_seed: list[dict], split: str) -> dict:
    """Mean and std over seeds of each column, per modality."""
    out = {}
    for m in MODALITIES:
        runs = [r["metrics"][split] for r in per_seed]
        out[m] = {
            "average_accuracy": mean_std([r["average_accuracy"][m] for r in runs]),
            "average_accuracy_l2p": mean_std([r["average_accuracy_l2p"][m] for r in runs]),
            "final_accuracy": mean_std([r["final_accuracy"][m] for r in runs]),
            "diagonal_mean": mean_std([statistics.fmean(r["diagonal"][m]) for r in runs]),
            "diagonal_min": mean_std([min(r["diagonal"][m]) for r in runs]),
            "diagonal": [mean_std(list(d)) for d in zip(*(r["diagonal"][m] for r in runs))],
            **{f"forgetting_{k}": mean_std([r["forgetting"][m][k] for r in runs]) for k in ("avcil", "facil", "l2p")},
        }
    return out


def print_table(table: dict[str, dict], split: str, title: str) -> None:
    """One row per method (or ablation row) and modality: mean +- std of each of COLUMNS on ``split``."""
    print(f"\n{title}")
    print(f"{'row':<10}{'modality':<14}" + "".join(f"{c:>20}" for c in COLUMNS))
    for row, entry in table.items():
        for m in MODALITIES:
            cells = "".join(f"{entry['summary'][split][m][c][0]:>13.1f} +- {entry['summary'][split][m][c][1]:<4.1f}"
                            for c in COLUMNS)
            print(f"{row:<10}{m:<14}{cells}")


def markdown_table(table: dict[str, dict], split: str, columns: tuple[str, ...] = COLUMNS) -> str:
    """``print_table``'s rows as a markdown table, mean ± std."""
    lines = ["| row | modality | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "| --- | --- |" + " --- |" * len(columns)]
    for row, entry in table.items():
        for m in MODALITIES:
            cells = " | ".join("{:.1f} ± {:.1f}".format(*entry["summary"][split][m][c]) for c in columns)
            lines.append(f"| {row} | {m} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["cign", "finetune", "joint"])
    ap.add_argument("--rehearsal-sampling", choices=REHEARSAL_SAMPLING, default="balanced")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-cil"))
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()
    table: dict[str, dict] = {}
    for method in args.methods:
        per_seed = []
        for seed in args.seeds:
            metrics, seconds, reused = run_one(method, seed, args.rehearsal_sampling, args.runs, args.data_dir)
            per_seed.append({"seed": seed, "seconds": None if reused else round(seconds, 1), "metrics": metrics})
            print(f"{method} seed {seed}: " + ("finished earlier, re-read" if reused else f"{seconds:.0f} s"), flush=True)
        table[method] = {"summary": {split: summarize_seeds(per_seed, split) for split in ("val", "test")},
                         "runs": per_seed}
    machine = bench_machine.describe()
    for split in ("val", "test"):
        print_table(table, split, f"avdigits, cpu preset, {args.rehearsal_sampling} rehearsal batches, {split} split, "
                                  f"seeds {args.seeds}: mean +- std (%); {bench_machine.label(machine)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine |= {"torch_threads": torch.get_num_threads()}
    out = RESULTS / f"cil_avdigits_{args.rehearsal_sampling}.json"
    out.write_text(json.dumps({"machine": machine, "rehearsal_sampling": args.rehearsal_sampling, "seeds": args.seeds,
                               "chosen_on": "val", "methods": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
