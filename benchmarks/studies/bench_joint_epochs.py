"""Question: how far does the ``joint`` upper bound's audio rise when it trains longer?
Answer: twice the preset's epochs lift its audio and visual final accuracy; the methods table keeps the
shared schedule. Results: ``benchmarks/studies/results/joint_epochs_avdigits.json``.

How long the ``joint`` upper bound trains: the ``cpu`` preset's epochs times a factor.

``joint`` (every task trains on all seen classes' data, the model carried over) is the upper bound
of the methods table, not the default run, so the 10-minute budget does not bind it. For each
``--factors`` F and seed, one run with F x the preset's epochs (12 on the first task, 8 after),
scored on val while training (the choice is made there), then its task checkpoints re-scored on
test for reporting (``cign_train.experiments.run_metrics``, cached as ``metrics_test.json``).
Finished runs in ``--runs/joint-xF-seedS`` are re-read, not trained again. Prints final accuracy
per modality, mean +- std over seeds, per split, and the seconds each run trained in this
invocation; writes ``--output`` (``benchmarks/studies/results/joint_epochs_avdigits.json``) with the CPU named.
"""
from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

import torch

from cign_train.evaluate import MODALITIES
from cign_train.experiments import cell, mean_std, run_metrics, summarize, train
from cign_train.settings import preset_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-joint-epochs"))
    ap.add_argument("--output", type=Path, default=RESULTS / "joint_epochs_avdigits.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = preset_settings("cpu")
    rows = []
    for factor in a.factors:
        runs = []
        for seed in a.seeds:
            s = preset_settings("cpu", method="joint", seed=seed, data_dir=a.data_dir, eval_split="val",
                                epochs=base.epochs * factor, first_task_epochs=base.first_task_epochs * factor)
            path = a.runs / f"joint-x{factor}-seed{seed}"
            trained = not (path / "metrics.json").is_file()
            seconds = train(s, path)
            runs.append({"seed": seed, "seconds": round(seconds, 1) if trained else None,
                         "metrics": run_metrics(s, path)})
        rows.append({"factor": factor, "epochs": [base.first_task_epochs * factor, base.epochs * factor],
                     "runs": runs, **{split: summarize(runs, split) for split in ("val", "test")}})
    info = machine.describe()
    print(f"joint, final accuracy on all ten classes (%), mean ± std over seeds {a.seeds}; {machine.label(info)}")
    print("| epochs (first / later tasks) | split | audio | visual | audio-visual | seconds per run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        timed = [x["seconds"] for x in r["runs"] if x["seconds"] is not None]
        secs = cell(mean_std(timed), len(timed), 0) if timed else "(re-read)"
        for split in ("val", "test"):
            cells = [cell(r[split][m]["final_accuracy"], len(r["runs"])) for m in MODALITIES]
            print(f"| {r['epochs'][0]} / {r['epochs'][1]} | {split} | " + " | ".join(cells) + f" | {secs} |")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps({"machine": info, "seeds": a.seeds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
