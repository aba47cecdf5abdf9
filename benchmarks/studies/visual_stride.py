"""Question: can the cpu preset's training step shed the FLOPs that keep ``make demo`` over 10 minutes on
AVX2, without losing accuracy, by striding the visual cnn8's first convolution (as the audio one is)?
Answer: no. Stride 2 halves the step's FLOPs and its AVX2 time, but CIGN's visual branch loses about 20
points of final val accuracy (3 seeds): the digits need the full-resolution map. The preset keeps stride 1.
Results: ``benchmarks/studies/results/visual_stride.json``.

The AVX2 fp32 step is compute-bound: torch.utils.flop_counter counts its FLOPs and the step runs near
the AVX2 FMA peak, so only fewer FLOPs make it faster. Per ``CIGNConfig.visual_stride`` (1: the preset;
2: the visual encoder at half resolution, a quarter of its FLOPs and P = 16 locations instead of 64):

- FLOPs of one training step on a task after the first (student + teacher + eqs 8-10 + backward), and
  its time natively (``--amp auto``'s precision) and in fp32 on the AVX2 instruction set (CPUID mask,
  a child process), batch 16, interleaved rounds, the best round;
- the default CIGN run on avdigits' val split per seed (``--seeds``), native precision, its wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cign_runtime import isa
from cign_train import experiments, precision, throughput
from cign_train.data.ingest import ensure_avdigits
from cign_train.evaluate import MODALITIES
from cign_train.settings import PRESETS, preset_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STRIDES = (1, 2)
BATCH, STEPS, ROUNDS = 16, 5, 3
#: fp32 FLOPs an AVX2 core can retire per cycle: two 8-lane fused multiply-adds (2 FLOPs each).
AVX2_FLOP_PER_CYCLE = 2 * 8 * 2


def avx2_peak_gflops(info: dict) -> float | None:
    """The cores' AVX2 fp32 FMA peak at the clock /proc/cpuinfo reports (None where it reports none)."""
    mhz = isa.cpuinfo().get("cpu MHz")
    return round(info["cores"] * float(mhz) * AVX2_FLOP_PER_CYCLE / 1000, 1) if mhz else None


def config(stride: int):
    return dataclasses.replace(PRESETS["cpu"]["model"], visual_stride=stride)


def step_flops(stride: int) -> float:
    step = throughput.training_step("cpu", BATCH, torch.device("cpu"), None, cfg=config(stride))[0]
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def step_ms(kind: str) -> dict[int, float]:
    """Best-round ms per step of each stride, on the instruction set ``kind``, in a child process."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import visual_stride as v; "
            f"print(json.dumps(v.child_step_ms()))")
    done = subprocess.run([sys.executable, "-c", code], env=isa.environ(kind), capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def child_step_ms() -> dict[int, float]:
    dtype = precision.autocast_dtype("auto", torch.device("cpu"))
    steps = {s: throughput.training_step("cpu", BATCH, torch.device("cpu"), dtype, cfg=config(s))[0] for s in STRIDES}
    for step in steps.values():
        step()
    best = {s: float("inf") for s in STRIDES}
    for _ in range(ROUNDS):
        for s, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            best[s] = min(best[s], (time.perf_counter() - start) / STEPS * 1000)
    return {s: round(ms, 1) for s, ms in best.items()}


def val_runs(stride: int, seeds, runs: Path, data_dir: str) -> list[dict]:
    out = []
    for seed in seeds:
        settings = preset_settings("cpu", seed=seed, eval_split="val", data_dir=data_dir, model=config(stride))
        path = runs / f"stride{stride}-seed{seed}"
        seconds = experiments.train(settings, path)
        metrics = json.loads((path / "metrics.json").read_text())
        out.append({"seed": seed, "seconds": round(seconds, 1), "amp": str(settings.amp),
                    **{k: metrics[k] for k in ("average_accuracy", "final_accuracy", "diagonal")}})
        print(f"stride {stride} seed {seed}: AV average {metrics['average_accuracy']['audio_visual']:.1f} "
              f"final {metrics['final_accuracy']['audio_visual']:.1f} ({seconds:.0f} s)", flush=True)
    return out


def summary(runs: list[dict]) -> dict:
    def stat(values):
        return [round(x, 2) for x in experiments.mean_std(values)]
    row = {f"{kind}_{m}": stat([r[f"{kind}_accuracy"][m] for r in runs]) for kind in ("average", "final") for m in MODALITIES}
    row["worst_just_learned_audio_visual"] = stat([min(r["diagonal"]["audio_visual"]) for r in runs])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/studies/visual-stride"))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--output", type=Path, default=RESULTS / "visual_stride.json")
    args = ap.parse_args()
    kinds = ["native"] + (["avx2"] if isa.unavailable("avx2") is None else [])
    ms = {kind: step_ms(kind) for kind in kinds}
    steps = {s: {"gflop": round(step_flops(s) / 1e9, 2), **{f"{k}_ms": ms[k][s] for k in kinds}} for s in STRIDES}
    for s, row in steps.items():
        print(f"stride {s}: {row}", flush=True)
    ensure_avdigits(args.data_dir, PRESETS["cpu"]["spec"], progress=False)
    runs = {s: val_runs(s, args.seeds, args.runs, args.data_dir) for s in STRIDES}
    info = machine.describe()
    doc = {"question": __doc__.split("\n")[0].removeprefix("Question: "), "machine": info,
           "avx2_peak_gflops": avx2_peak_gflops(info),
           "date": time.strftime("%Y-%m-%d"), "split": "val", "seeds": args.seeds, "batch": BATCH,
           "strides": {str(s): {"step": steps[s], "summary": summary(runs[s]), "runs": runs[s]} for s in STRIDES}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    for s in STRIDES:
        row = doc["strides"][str(s)]["summary"]
        print(f"stride {s}: " + ", ".join(f"{k} {v[0]:.1f} ± {v[1]:.1f}" for k, v in row.items()))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
