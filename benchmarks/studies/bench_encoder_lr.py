"""Question: does a faster learning rate for the audio encoder lift the joint run's audio?
Answer: no: joint's audio moves by less than the seeds' spread while CIGN learns a task less reliably;
the preset keeps one rate. Results: ``benchmarks/studies/results/encoder_lr_avdigits.json``.

An encoder's own learning rate on the ``cpu`` preset: CIGN and ``joint`` on avdigits' val split.

For each rate of ``--rates`` (``none``: the preset's, every group at ``--lr``), method and seed, one
``cign-train --eval-split val --METRIC-encoder-lr RATE`` run in ``--runs/METHOD-{a,v,e}lrRATE-seedS``
(``--jobs`` at a time; finished runs are re-read, so ``--no-train`` tabulates runs made elsewhere,
e.g. on a lent GPU). Prints mean +- std over seeds of the average / final accuracy per modality
and the lowest "just learned" audio-visual entry, and writes ``--output``
(``benchmarks/studies/results/encoder_lr_avdigits.json``) with every run's numbers under ``--label``
(the device; default this machine's CPU).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cign_train.evaluate import MODALITIES
from cign_train.experiments import mean_std

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: which encoder ``--encoder`` sweeps -> (cign-train option, run-folder tag)
ENCODERS = {"audio": ("--audio-encoder-lr", "alr"), "visual": ("--visual-encoder-lr", "vlr"), "both": ("--encoder-lr", "elr")}


def run_dir(a: argparse.Namespace, method: str, rate: str, seed: int) -> Path:
    return a.runs / f"{method}-{ENCODERS[a.encoder][1]}{rate}-seed{seed}"


def train(a: argparse.Namespace, method: str, rate: str, seed: int) -> None:
    out = run_dir(a, method, rate, seed)
    if (out / "metrics.json").is_file():
        return
    cmd = [sys.executable, "-m", "cign_train.cli.train", "--data-dir", a.data_dir, "--device", a.device, "--threads",
           str(a.threads), "--no-progress", "--eval-split", "val", "--method", method, "--seed", str(seed), "--out", str(out),
           *([ENCODERS[a.encoder][0], rate] if rate != "none" else []), *a.train_args.split()]
    if out.exists():
        cmd.append("--resume")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def summary(metrics: list[dict]) -> dict:
    def stat(values):
        return dict(zip(("mean", "std"), (round(x, 2) for x in mean_std(values))))
    row = {f"{kind}_{mod}": stat([m[f"{kind}_accuracy"][mod] for m in metrics])
           for kind in ("average", "final") for mod in MODALITIES}
    row["worst_just_learned_audio_visual"] = stat([min(m["diagonal"]["audio_visual"]) for m in metrics])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-encoder-lr"))
    ap.add_argument("--encoder", choices=sorted(ENCODERS), default="audio")
    ap.add_argument("--rates", nargs="+", default=["none", "6e-4", "1e-3"])
    ap.add_argument("--methods", nargs="+", default=["cign", "joint"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (8 on a GPU machine's 16 cores)")
    ap.add_argument("--no-train", action="store_true", help="only tabulate the finished runs in --runs")
    ap.add_argument("--label", help="the device the runs ran on [default: this machine's CPU, or the GPU's name]")
    ap.add_argument("--train-args", default="", help="extra cign-train arguments (a quick check: '--epochs 1 --max-per-class 40')")
    ap.add_argument("--note", help="how the runs were made, kept in the results (e.g. with --no-train)")
    ap.add_argument("--output", type=Path, default=RESULTS / "encoder_lr_avdigits.json")
    a = ap.parse_args()
    jobs = [(m, r, s) for s in a.seeds for r in a.rates for m in a.methods]
    if not a.no_train:
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda j: train(a, *j), jobs))
    rows = []
    for rate in a.rates:
        for method in a.methods:
            found = {s: run_dir(a, method, rate, s) / "metrics.json" for s in a.seeds}
            metrics = {s: json.loads(f.read_text()) for s, f in found.items() if f.is_file()}
            if metrics:
                rows.append({"encoder": a.encoder, "rate": rate, "method": method, "seeds": sorted(metrics),
                             **summary(list(metrics.values())),
                             "runs": {s: {k: m[k] for k in ("average_accuracy", "final_accuracy", "diagonal")}
                                      for s, m in metrics.items()}})
    if a.label:
        label = a.label
    elif a.device.startswith("cuda"):
        import torch
        label = torch.cuda.get_device_name()
    else:
        label = machine.label(machine.describe())
    print(f"{a.encoder} encoder's lr, val split, {label} (mean +- std over seeds, %)")
    print("| rate | method | seeds | AV average | AV final | audio final | visual final | worst just-learned AV |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r[k]['mean']:.1f} ± {r[k]['std']:.1f}" for k in
                 ("average_audio_visual", "final_audio_visual", "final_audio", "final_visual", "worst_just_learned_audio_visual")]
        print(f"| {r['rate']} | {r['method']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    results = json.loads(a.output.read_text()) if a.output.is_file() else {"sweeps": []}
    results["sweeps"] = [s for s in results["sweeps"] if not (s["label"] == label and s["encoder"] == a.encoder)]
    results["sweeps"].append({"label": label, "encoder": a.encoder, "split": "val", "train_args": a.train_args,
                              "host": machine.describe() if not a.no_train else None,
                              "command": " ".join(sys.argv), "note": a.note, "rows": rows})
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
