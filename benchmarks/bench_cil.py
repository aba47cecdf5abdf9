"""Class-incremental accuracy on avdigits: CIGN against fine-tuning (the lower bound), over seeds.

Runs the default ``cign-train`` procedure (``cpu`` preset, 5 tasks x 2 classes) once per method
and seed, in ``runs/bench-cil/SAMPLING/METHOD-seedS`` (a finished run is reused, an interrupted
one resumed), and prints mean +- std over seeds of average accuracy, final accuracy and both
forgetting definitions, per modality. ``--rehearsal-sampling uniform`` repeats it with the
paper-literal batches (see ``Trainer.class_balance``). Writes
``benchmarks/results/cil_avdigits_SAMPLING.json``. About 7 min (CIGN) and 4 min (fine-tuning)
per run on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cign_train.checkpoint import last_finished_task
from cign_train.data.definitions import get_definition
from cign_train.settings import REHEARSAL_SAMPLING, preset_settings
from cign_train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
MODALITIES = ("audio_visual", "audio", "visual")


def run_one(method: str, seed: int, sampling: str, runs: Path, data_dir: str) -> tuple[dict, float, bool]:
    """(metrics, seconds, whether the run was already finished and only re-read)."""
    run_dir = runs / sampling / f"{method}-seed{seed}"
    n_tasks = len(get_definition("avdigits").task_classes(None))
    finished = last_finished_task(run_dir, n_tasks) == n_tasks - 1
    settings = preset_settings("cpu", method=method, seed=seed, rehearsal_sampling=sampling, data_dir=data_dir)
    start = time.perf_counter()
    metrics = Trainer(settings, run_dir, progress=False).run(resume=(run_dir / "config.json").is_file())
    return metrics, time.perf_counter() - start, finished


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["cign", "finetune"])
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
        summary = {}
        for m in MODALITIES:
            summary[m] = {
                "average_accuracy": mean_std([r["metrics"]["average_accuracy"][m] for r in per_seed]),
                "final_accuracy": mean_std([r["metrics"]["final_accuracy"][m] for r in per_seed]),
                "forgetting_avcil": mean_std([r["metrics"]["forgetting"][m]["avcil"] for r in per_seed]),
                "forgetting_final": mean_std([r["metrics"]["forgetting"][m]["final"] for r in per_seed]),
            }
        table[method] = {"summary": summary, "runs": per_seed}
    cols = ("average_accuracy", "final_accuracy", "forgetting_avcil", "forgetting_final")
    print(f"\navdigits, cpu preset, {args.rehearsal_sampling} rehearsal batches, seeds {args.seeds}: mean +- std (%)")
    print(f"{'method':<10}{'modality':<14}" + "".join(f"{c:>20}" for c in cols))
    for method, entry in table.items():
        for m in MODALITIES:
            cells = "".join(f"{entry['summary'][m][c][0]:>13.1f} +- {entry['summary'][m][c][1]:<4.1f}" for c in cols)
            print(f"{method:<10}{m:<14}{cells}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    out = RESULTS / f"cil_avdigits_{args.rehearsal_sampling}.json"
    out.write_text(json.dumps({"machine": info, "rehearsal_sampling": args.rehearsal_sampling, "seeds": args.seeds,
                               "methods": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
