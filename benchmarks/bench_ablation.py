"""Table 4 of the paper on avdigits: what CIGN's two modules add, over seeds, chosen on val and
reported on test.

Rows: replay only (``--no-avctd --no-avcg``: the rehearsal buffer with class-balanced batches and
eq 8's BCE), AVCTD only (eq 8's token KL + token CE), AVCG only (eq 9), both (CIGN), and both under
the paper-literal readings of eqs 8-9 (``literal``: KL and CE on the raw token table, eq 9's
negatives at their own class, the negatives-only denominator, the teacher's running BatchNorm
statistics); fine-tuning and joint training as floor and ceiling (the runs of ``bench_cil.py``,
reused when it has made them). Each run is the default ``cign-train`` (``cpu`` preset, 5 tasks x 2
classes), scored on val while it trains and re-scored on test from its checkpoints. Besides the
accuracy metrics it reads each run's TensorBoard diagnostics (issue 10): median over steps of eq
9's positive share ``p_pos`` and of the loss terms, and the median gradient-norm ratio of each term
to BCE's on the shared body. Runs live in ``runs/bench-cil/balanced/NAME-seedS`` (finished ones are
re-read, interrupted ones resumed), so a killed sweep continues where it stopped; ``--rows`` and
``--seeds`` split a sweep across processes (``--threads 1`` each on a 2-core machine). Writes
``benchmarks/results/ablation_avdigits.json`` with the CPU named and the tables as markdown in
``ablation_avdigits.md``; ``--no-write`` only prints.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import machine as bench_machine
from bench_cil import RESULTS, markdown_table, mean_std, print_table, run_one, summarize_seeds

#: row -> (method, model-config overrides); the order of the printed table.
ROWS = {
    "finetune": ("finetune", {}),
    "replay": ("cign", {"use_avctd": False, "use_avcg": False}),
    "avctd": ("cign", {"use_avcg": False}),
    "avcg": ("cign", {"use_avctd": False}),
    "both": ("cign", {}),
    "literal": ("cign", {"token_source": "table", "ctl_negatives": "label", "ctl_denominator": "paper",
                         "teacher_bn": "running"}),
    "joint": ("joint", {}),
}
#: TensorBoard scalars summarised per run (median over the steps that logged them).
DIAGNOSTICS = ("loss/kl", "loss/ce", "loss/ctl", "diag/ctl_p_pos_a", "diag/ctl_p_pos_v", "diag/ctl_cos_pos_a",
               "diag/ctl_cos_neg_a", "diag/grad_ratio_kl", "diag/grad_ratio_ce", "diag/grad_ratio_ctl",
               "diag/teacher_student_cos_a", "diag/teacher_student_cos_v")


def run_diagnostics(run_dir: Path) -> dict[str, float]:
    """Median of each of DIAGNOSTICS over the run's logged steps (absent tags are left out)."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {t: statistics.median(e.value for e in events.Scalars(t)) for t in DIAGNOSTICS if t in tags}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-cil"))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, help="torch threads of this process [default: torch's]")
    ap.add_argument("--no-write", action="store_true", help="print the table only (a partial sweep)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table: dict[str, dict] = {}
    for row in args.rows:
        method, overrides = ROWS[row]
        per_seed = []
        for seed in args.seeds:
            name = method if row in ("finetune", "joint") else f"cign-{row}"
            metrics, seconds, reused = run_one(method, seed, "balanced", args.runs, args.data_dir, name, overrides)
            diag = run_diagnostics(args.runs / "balanced" / f"{name}-seed{seed}")
            per_seed.append({"seed": seed, "seconds": None if reused else round(seconds, 1), "metrics": metrics,
                             "diagnostics": diag})
            print(f"{row} seed {seed}: " + ("finished earlier, re-read" if reused else f"{seconds:.0f} s"), flush=True)
        table[row] = {"method": method, "model": overrides, "runs": per_seed,
                      "summary": {split: summarize_seeds(per_seed, split) for split in ("val", "test")},
                      "diagnostics": {k: mean_std([r["diagnostics"][k] for r in per_seed])
                                      for k in DIAGNOSTICS if all(k in r["diagnostics"] for r in per_seed)}}
    machine = bench_machine.describe() | {"torch_threads": torch.get_num_threads()}
    for split in ("val", "test"):
        print_table(table, split, f"Table 4 on avdigits, cpu preset, {split} split, seeds {args.seeds}: mean +- std (%); "
                                  f"{bench_machine.label(machine)}")
    print("\ndiagnostics: median over steps, mean +- std over seeds")
    for row, entry in table.items():
        print(f"{row:<10}" + "  ".join(f"{k.split('/')[1]} {v[0]:.3g}+-{v[1]:.2g}" for k, v in entry["diagnostics"].items()))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "ablation_avdigits.json"
    out.write_text(json.dumps({"machine": machine, "seeds": args.seeds, "chosen_on": "val", "reported_on": "test",
                               "rows": table}, indent=1))
    md = RESULTS / "ablation_avdigits.md"
    md.write_text("".join(f"### {split} split, seeds {args.seeds}, mean ± std (%); {bench_machine.label(machine)}\n\n"
                          + markdown_table(table, split) + "\n" for split in ("test", "val")))
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
