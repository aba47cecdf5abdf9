"""Question: does ``cign-pretrain`` learn on avdigits, and do its encoders help CIGN (val split)?
Answer: no objective moves the embeddings towards the digits, and CIGN started from them is worse, visual
most; the default run trains from scratch. Results: ``benchmarks/studies/results/pretrain_avdigits.json``
(infonce, clusters) and ``pretrain_simclr_ezvsl_avdigits.json`` (simclr, ezvsl).

Stage 1 runs ``cign-pretrain`` for each objective / temperature / lr of ``CONFIGS`` (``--jobs`` at
a time, each stopped after ``--pretrain-seconds``; the checkpoint is rewritten every epoch, so the
last finished epoch counts) and reads each checkpoint's per-epoch history: the val objective, class
retrieval and the k-means NMI of the audio / visual embeddings with the labels (labels read for
evaluation only). Stage 2 trains CIGN on val from scratch and from the checkpoint with the highest
final val NMI (audio + visual), ``--seeds`` each, plus ``joint`` from that checkpoint. Prints a
table and writes ``--output`` (default ``benchmarks/studies/results/pretrain_avdigits.json``) with the device, the commands and the
histories. Made for a GPU machine (``--device cuda``); on 2 CPU cores (``--device cpu --jobs 1``) a
configuration's 10 epochs take 1-2 minutes with ``cnn8``, a CIGN run 3-4.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402


RESULTS = Path(__file__).parent / "results"
#: name -> (objective, tau, lr, prototypes, batch size, cross); the first eight made the H100 sweep of
#: ``pretrain_avdigits.json``, the last four the 2-core CPU one of ``pretrain_simclr_ezvsl_avdigits.json``
CONFIGS = {
    "nce07": ("infonce", 0.07, 3e-4, 30, 128, 0.0),
    "nce2": ("infonce", 0.2, 1e-3, 30, 128, 0.0),
    "nce5": ("infonce", 0.5, 1e-3, 30, 128, 0.0),
    "cl1s": ("clusters", 0.1, 3e-4, 30, 128, 0.0),
    "cl1": ("clusters", 0.1, 1e-3, 30, 128, 0.0),
    "cl1p10": ("clusters", 0.1, 1e-3, 10, 128, 0.0),
    "cl2": ("clusters", 0.2, 1e-3, 30, 128, 0.0),
    "cl1b64": ("clusters", 0.1, 1e-3, 30, 64, 0.0),
    "simclr2": ("simclr", 0.2, 1e-3, 30, 128, 0.0),
    "simclr2x1": ("simclr", 0.2, 1e-3, 30, 128, 1.0),
    "ezvsl1": ("ezvsl", 0.1, 1e-3, 30, 128, 0.0),
    "ezvsl03": ("ezvsl", 0.03, 1e-4, 30, 128, 0.0),
}


def pretrain(name: str, work: Path, a: argparse.Namespace) -> dict:
    objective, tau, lr, prototypes, batch, cross = CONFIGS[name]
    out = work / f"{name}.pt"
    cmd = [sys.executable, "-m", "cign_train.cli.pretrain", "--data-dir", a.data_dir, "--device", a.device,
           "--threads", str(a.threads), "--epochs", str(a.epochs), "--objective", objective, "--tau", str(tau),
           "--lr", str(lr), "--prototypes", str(prototypes), "--batch-size", str(batch), "--cross", str(cross), "--out", str(out),
           "--no-progress"]
    try:
        subprocess.run(cmd, check=True, timeout=a.pretrain_seconds, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass  # the checkpoint of the last finished epoch stays
    history = torch.load(out, weights_only=True)["pretrain"]["history"]
    return {"name": name, "objective": objective, "tau": tau, "lr": lr,
            "prototypes": prototypes if objective == "clusters" else None, "batch_size": batch,
            "cross": cross if objective == "simclr" else None, "history": history,
            "checkpoint": str(out)}


def train(tag: str, seed: int, work: Path, a: argparse.Namespace, extra: list[str]) -> dict:
    out = work / f"{tag}-s{seed}"
    cmd = [sys.executable, "-m", "cign_train.cli.train", "--data-dir", a.data_dir, "--device", a.device, "--threads",
           str(a.threads), "--no-progress", "--eval-split", "val", "--seed", str(seed), "--out", str(out), *extra,
           *a.train_args.split()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = json.loads((out / "metrics.json").read_text())
    return {"tag": tag, "seed": seed, "args": extra,
            **{k: m[k] for k in ("eval_split", "average_accuracy", "final_accuracy", "diagonal", "forgetting")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-pretrain"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=8, help="runs at a time")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--pretrain-seconds", type=float, default=155)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--output", type=Path, default=RESULTS / "pretrain_avdigits.json")
    ap.add_argument("--train-args", default="", help="extra cign-train arguments (a quick check: '--epochs 1 --max-per-class 40')")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(lambda n: pretrain(n, a.work, a), a.configs))
    print("| run | objective | tau | lr | epochs | val objective | val class retrieval (chance) | val NMI audio / visual |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        h = r["history"]
        print(f"| {r['name']} | {r['objective']} | {r['tau']} | {r['lr']} | {h['epoch'][-1]} | {h['val_loss'][-1]:.2f} | "
              f"{100 * h['val_class_retrieval'][-1]:.1f} % ({100 * h['val_class_chance'][-1]:.1f} %) | "
              f"{h['val_nmi_audio'][-1]:.2f} / {h['val_nmi_visual'][-1]:.2f} |")
    best = max(runs, key=lambda r: r["history"]["val_nmi_audio"][-1] + r["history"]["val_nmi_visual"][-1])
    jobs = [("cign", s, []) for s in a.seeds] + [("cignpt", s, ["--encoder-weights", best["checkpoint"]]) for s in a.seeds]
    jobs.append(("jointpt", a.seeds[0], ["--method", "joint", "--encoder-weights", best["checkpoint"]]))
    with ThreadPoolExecutor(a.jobs) as pool:
        cil = list(pool.map(lambda j: train(j[0], j[1], a.work, a, j[2]), jobs))
    print(f"\nCIGN on val from scratch (cign) and from {best['name']} (cignpt, jointpt):")
    print("| run | seed | AV average | AV final | visual average | audio final |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in cil:
        print(f"| {r['tag']} | {r['seed']} | {r['average_accuracy']['audio_visual']:.1f} | "
              f"{r['final_accuracy']['audio_visual']:.1f} | {r['average_accuracy']['visual']:.1f} | "
              f"{r['final_accuracy']['audio']:.1f} |")
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else machine.label(machine.describe())
    out = a.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "host": machine.describe(), "jobs_at_a_time": a.jobs,
                               "pretrain_seconds": a.pretrain_seconds, "split": "val", "best": best["name"],
                               "train_args": a.train_args, "pretraining": runs, "cign_runs": cil,
                               "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
