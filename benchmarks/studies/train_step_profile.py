"""Where does a training step's time go on AVX2 in fp32, against the native bf16 step?

Question: the default run trains in fp32 on an AVX2-only CPU and takes about twice the native bf16
run's time; which parts of the ``cpu`` preset's step (batch 16) take it, so that the time can be
found where it is rather than by training less?

Method: ``cign_train.throughput.training_step`` (the trainer's step: student and teacher forward,
eqs 8-10, backward, guarded Adam update) at the ``cpu`` preset, after two warm-up steps, under
``torch.profiler`` for ``--steps`` steps: self CPU time per operator, and the forward + backward of
each part of the model timed alone (audio encoder, visual encoder, everything after them). Run per
kind in a fresh process: ``native`` (``--amp auto``'s precision here), ``native-fp32``, and ``avx2``
(fp32 under the CPUID mask, ``cign_runtime.isa``: AVX-512, VNNI, BF16 and AMX hidden).

Answer: ``results/train_step_profile.json`` (per kind: step time, the parts, the top operators).

    python benchmarks/studies/train_step_profile.py [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_step_profile.json"
KINDS = ("native", "native-fp32", "avx2")
BATCH = 16


def parts(dtype, repeats: int) -> dict[str, float]:
    """ms of forward + backward of each part of the cpu preset's model alone, on a batch of BATCH."""
    import torch

    from cign_runtime.spec import get_preset
    from cign_train.model import CIGN
    from cign_train.precision import autocast
    from cign_train.settings import PRESETS

    cfg, spec = PRESETS["cpu"]["model"], get_preset(PRESETS["cpu"]["spec"])
    device = torch.device("cpu")
    model = CIGN(cfg, 20).to(memory_format=torch.channels_last).train()
    spectrograms = torch.randn(BATCH, *spec.spectrogram_shape)
    frames = torch.randn(BATCH, 3, spec.frame_size, spec.frame_size).contiguous(memory_format=torch.channels_last)

    def time_it(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats

    def encoder(enc, x):
        def fn():
            with autocast(device, dtype):
                out = enc(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        return fn

    def whole():
        with autocast(device, dtype):
            out = model(spectrograms, frames)
        (out.logits_a.float().sum() + out.logits_v.float().sum()).backward()

    audio = time_it(encoder(model.audio_encoder, spectrograms))
    visual = time_it(encoder(model.visual_encoder, frames))
    total = time_it(whole)
    return {"audio_encoder_ms": round(audio, 2), "visual_encoder_ms": round(visual, 2),
            "model_forward_backward_ms": round(total, 2), "after_encoders_ms": round(total - audio - visual, 2)}


def profile(kind: str, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from cign_train.precision import autocast_dtype
    from cign_train.throughput import training_step

    dtype = None if kind != "native" else autocast_dtype("auto", torch.device("cpu"))
    step = training_step("cpu", BATCH, torch.device("cpu"), dtype)[0]
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
            "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // steps} for e in ops[:15]]
    return {"kind": kind, "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
            "step_ms": round(step_ms, 1), **parts(dtype, steps), "top_ops": top, "machine": machine.describe()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # a child's one kind
    args = ap.parse_args()
    if args.kind:
        print(json.dumps(profile(args.kind, args.steps)))
        return
    from cign_runtime import isa

    runs = []
    for kind in KINDS:
        env = isa.environ("avx2" if kind == "avx2" else "native")
        child = subprocess.run([sys.executable, __file__, "--kind", kind, "--steps", str(args.steps)], env=env,
                               capture_output=True, text=True, timeout=1800)
        if child.returncode != 0:
            sys.exit(f"{kind}: {child.stderr[-2000:]}")
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{kind:<12} {r['precision']:<9} step {r['step_ms']:>7.1f} ms | fwd+bwd alone: audio encoder "
              f"{r['audio_encoder_ms']:.1f}, visual encoder {r['visual_encoder_ms']:.1f}, after them "
              f"{r['after_encoders_ms']:.1f} ms", flush=True)
        for op in r["top_ops"][:8]:
            print(f"    {op['op']:<48} {op['self_ms_per_step']:>8.2f} ms/step {100 * op['share']:>5.1f} %")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"question": __doc__.split("\n")[0], "batch": BATCH, "steps": args.steps,
                                       "machine": machine.describe(), "label": machine.label(machine.describe()),
                                       "runs": runs}, indent=1) + "\n")
    print(f"on {machine.label(machine.describe())}; wrote {args.output}")


if __name__ == "__main__":
    main()
