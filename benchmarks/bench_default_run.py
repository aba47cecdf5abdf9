"""Wall time of the default ``cign-train`` (cpu preset, avdigits, 5 tasks) on both CPU kinds, from one machine.

The budget: the default run takes <= 10 min of training on a 2-core CPU with native bf16
(AVX512-BF16 / AMX, where ``--amp auto`` trains in bf16) and on one with AVX2 only (where it
trains in fp32). On a bf16 machine both are measured: once as is, once with the AVX2-only
instruction set (``cign_runtime.isa``: CPUID hides AVX-512, VNNI, AVX512-BF16 and AMX from torch,
oneDNN, numpy and onnxruntime, and ``--amp auto`` then trains in fp32 as on an AVX2-only CPU);
where the mask cannot run (no CPUID faulting: AMD hosts), kind ``avx2-libs`` holds torch's
libraries to AVX2 instead (``LIBS_AVX2``). Each run is a fresh ``cign-train`` process on the
already prepared store (generation and preparation are timed by ``bench_data.py``), one at a time.
Writes ``benchmarks/results/default_run[SUFFIX].json`` (``--suffix _avx512`` for a second CPU's run
beside the first: the suffix names what differs, not the machine): seconds per kind, their ratio, the run's
accuracy and the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import machine

from cign_runtime import isa

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 600
KINDS = ("native", "avx2", "avx2-libs")
#: ``avx2-libs``, for hosts without CPUID faulting (AMD, where ``avx2`` cannot run): torch's own
#: switches hold ATen, oneDNN and MKL to AVX2 and the run trains in fp32 (``--amp off``), as
#: ``--amp auto`` does on a CPU without native bf16. Only torch is held (numpy and the data loader
#: keep the host's instruction set), which is what a training run's time depends on.
LIBS_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def environ(kind: str) -> dict[str, str]:
    return {**os.environ, **LIBS_AVX2} if kind == "avx2-libs" else isa.environ(kind)


def autocast(kind: str) -> str:
    """What ``--amp auto`` trains in on the CPU with that instruction set (None: fp32)."""
    if kind == "avx2-libs":
        return "None"
    code = "import torch; from cign_train.precision import autocast_dtype; print(autocast_dtype('auto', torch.device('cpu')))"
    return subprocess.run([sys.executable, "-c", code], env=environ(kind), capture_output=True, text=True,
                          check=True).stdout.strip()


def run(kind: str, runs: Path, data_dir: str) -> dict:
    out = runs / kind
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cign_train.cli.train", "--data-dir", data_dir, "--out", str(out), "--no-progress"]
    if kind == "avx2-libs":
        cmd += ["--amp", "off"]
    start = time.perf_counter()
    subprocess.run(cmd, env=environ(kind), check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": round(seconds, 1), "cpu_isa": kind, "autocast": autocast(kind), "eval_split": metrics["eval_split"],
            "average_accuracy": metrics["average_accuracy"], "final_accuracy": metrics["final_accuracy"],
            "diagonal": metrics["diagonal"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", choices=KINDS,
                    default=["native", "avx2" if isa.unavailable("avx2") is None else "avx2-libs"],
                    help="default: native and avx2, or avx2-libs where the CPUID mask cannot run")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-default"))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--suffix", default="", help="appended to the results file's name (another CPU's results beside these)")
    args = ap.parse_args()
    info = machine.describe()
    results = {kind: run(kind, args.runs, args.data_dir) for kind in args.kinds}
    print(f"\ndefault cign-train on {machine.label(info)}")
    print(f"{'kind':<12}{'seconds':>9}{'budget':>9}  AV average / final accuracy (%)")
    for kind, r in results.items():
        av = r["average_accuracy"]["audio_visual"], r["final_accuracy"]["audio_visual"]
        print(f"{kind:<12}{r['seconds']:>9.0f}{BUDGET_S:>9}  {av[0]:.1f} / {av[1]:.1f}")
    doc = {"machine": info, "budget_s": BUDGET_S, "kinds": results}
    for kind in ("avx2", "avx2-libs"):
        if {"native", kind} <= results.keys():
            doc[f"{kind}_over_native"] = round(results[kind]["seconds"] / results["native"]["seconds"], 2)
            print(f"{kind} / native: {doc[f'{kind}_over_native']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"default_run{args.suffix}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
