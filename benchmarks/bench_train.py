"""Training throughput (samples/s) of one CIGN step at each preset's input shapes.

A step is what the trainer does on a task after the first: the current model's forward, the
frozen teacher's forward, eqs 8-10, backward and an Adam update through the trainer's guard against
non-finite gradients, on random inputs of the preset's spec, channels_last, in fp32 and in the
trainer's ``--amp auto`` precision (bf16 on CUDA and on CPUs with native bf16). ``guard`` is what the
guard adds to a step (``cign_train.throughput.guard_seconds``), in ms and as a share of the step. Writes ``--output`` (``benchmarks/results/train_<device>.json``) with the
machine named and prints a table; quote ratios from one run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import machine
from cign_runtime.spec import get_preset
from cign_train.precision import autocast_dtype
from cign_train.settings import PRESETS
from cign_train.throughput import guard_seconds, step_rate

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--output", type=Path, help="[default: benchmarks/results/train_cpu.json or train_cuda.json]")
    args = ap.parse_args()
    device = torch.device(args.device)
    cases = [("cpu", PRESETS["cpu"]["batch_size"]), ("paper", 8)] if device.type == "cpu" else [("cpu", 128), ("paper", 128)]
    amp = autocast_dtype("auto", device)
    precisions = [None] if amp is None else [None, amp]
    rows = []
    for preset, batch in cases:
        spec = get_preset(PRESETS[preset]["spec"])
        shape = f"{spec.frame_size}px + {spec.n_freq}x{spec.n_time}"
        for dtype in precisions:
            rate = step_rate(preset, batch, args.steps, device, dtype)
            guard = guard_seconds(preset, batch, device, dtype)
            name = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
            rows.append({"preset": preset, "inputs": shape, "batch": batch, "precision": name,
                         "samples_per_s": round(rate, 2), "guard_ms": round(1000 * guard, 3),
                         "guard_share": round(guard * rate / batch, 5)})
    print(f"{'preset':<8}{'inputs':<22}{'batch':>6}{'precision':>10}{'samples/s':>12}{'guard ms':>10}{'of step':>9}")
    for r in rows:
        print(f"{r['preset']:<8}{r['inputs']:<22}{r['batch']:>6}{r['precision']:>10}{r['samples_per_s']:>12.2f}"
              f"{r['guard_ms']:>10.2f}{100 * r['guard_share']:>8.2f}%")
    rate = {(r["preset"], r["precision"]): r["samples_per_s"] for r in rows}
    best = rows[-1]["precision"]
    print(f"cpu preset / paper preset throughput ({best}): {rate['cpu', best] / rate['paper', best]:.1f}x")
    if amp is not None:
        for preset, _ in cases:
            print(f"{preset} preset, {best} / fp32: {rate[preset, best] / rate[preset, 'fp32']:.2f}x")
    out = args.output or RESULTS / f"train_{'cuda' if device.type == 'cuda' else 'cpu'}.json"
    info = {**machine.describe(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(f"on {info['device'] if device.type == 'cuda' else machine.label(info)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
