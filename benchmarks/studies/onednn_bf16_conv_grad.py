"""Does oneDNN's bf16 convolution weight-gradient on this CPU return NaN at small batches?

Question: a bf16 training run on a 2-core Xeon (AVX512-BF16 + AMX) wrote NaN into one convolution's
weights while every loss stayed finite. Is the cause the oneDNN bf16 weight-gradient at batches of a
few clips, reading memory it never wrote, and which CPUs, kernels and versions show it?

Method: a lone ``Conv2d(32, 32, 3, padding=1)`` on (B, 32, 16, 151) inputs (the audio encoder's
second stage at the cpu preset), forward under ``torch.autocast("cpu", torch.bfloat16)`` and
backward, ``--calls`` times per batch size and memory layout; before each call the allocator's free
memory is filled with NaN (tensors of 1 KiB-8 MiB allocated, filled and freed), so that memory read
before it is written shows up as a non-finite gradient. Controls: fp32, and bf16 with oneDNN
disabled (``torch.backends.mkldnn.flags(enabled=False)``). It records the oneDNN implementation that
ran the backward-weights pass (``ONEDNN_VERBOSE``), the torch and oneDNN versions and the machine.

Answer: on the 2-core Xeon with AVX512-BF16 and AMX where the NaN appeared, yes, at batches of a few
clips, in oneDNN's AMX kernel (``brgconv_bwd_w:avx10_1_512_amx``; reproduced by this script on such a
Xeon), never in fp32 or with oneDNN disabled; on an AMD EPYC (AVX512-BF16, no AMX) never. Per-CPU
counts: ``benchmarks/studies/results/onednn_bf16_conv_grad.json`` (one entry per CPU; tabulated in
``docs/limitations.md``). The trainer guards against it either way (``cign_train.guard``, and
training batches are never a few clips: ``cign_train.data.loader.folded_sizes``).

    python benchmarks/studies/onednn_bf16_conv_grad.py            # add / replace this CPU's entry
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "onednn_bf16_conv_grad.json"
SHAPE = (32, 16, 151)  # channels, frequency, time
BATCHES = (1, 2, 3, 4, 5, 8, 16)


def poison() -> None:
    """Fill freed heap memory with NaN: allocate blocks from 1 KiB to 8 MiB, fill them, free them."""
    blocks = [torch.full((256 << k,), float("nan")) for k in range(14) for _ in range(3)]
    del blocks


def one_call(conv: torch.nn.Conv2d, batch: int, channels_last: bool, bf16: bool, seed: int) -> bool:
    """Whether one forward + backward gives a non-finite weight gradient."""
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    poison()
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = conv(x)
    y.float().square().mean().backward()
    return not bool(torch.isfinite(conv.weight.grad).all())


def count(batch: int, channels_last: bool, bf16: bool, calls: int, mkldnn: bool = True) -> int:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(SHAPE[0], SHAPE[0], 3, padding=1)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        return sum(one_call(conv, batch, channels_last, bf16, seed) for seed in range(calls))


def onednn_version() -> str | None:
    found = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else None


def implementation(batch: int, channels_last: bool) -> str | None:
    """The oneDNN implementation of the bf16 backward-weights convolution, from a child's ONEDNN_VERBOSE."""
    child = subprocess.run([sys.executable, __file__, "--probe", str(batch)] + (["--channels-last"] if channels_last else []),
                           env={**os.environ, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True, timeout=120)
    for line in child.stdout.splitlines():
        fields = line.split(",")
        if "convolution" in fields and "backward_weights" in fields:
            return fields[fields.index("convolution") + 1]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=40, help="calls per batch size, layout and precision")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # one call, for the verbose child
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        count(args.probe, args.channels_last, bf16=True, calls=1)
        return
    rows = []
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "contiguous"
        impl = implementation(1, channels_last)
        for batch in BATCHES:
            row = {"layout": layout, "batch": batch, "calls": args.calls, "implementation": impl,
                   "bf16": count(batch, channels_last, True, args.calls),
                   "fp32": count(batch, channels_last, False, args.calls),
                   "bf16_without_onednn": count(batch, channels_last, True, args.calls, mkldnn=False)}
            rows.append(row)
            print(f"{layout:<14} B {batch:>2}: non-finite weight gradients in {row['bf16']}/{args.calls} bf16 calls "
                  f"({impl}), {row['fp32']} fp32, {row['bf16_without_onednn']} bf16 without oneDNN", flush=True)
    info = machine.describe()
    entry = {"machine": info, "label": machine.label(info), "onednn": onednn_version(), "torch": torch.__version__,
             "source": "this script", "rows": rows}
    out = json.loads(args.output.read_text()) if args.output.is_file() else {"question": __doc__.split("\n")[0], "entries": []}
    out["entries"] = [e for e in out["entries"] if e["label"] != entry["label"] or e["source"] != entry["source"]] + [entry]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"on {entry['label']}, torch {entry['torch']}, oneDNN {entry['onednn']}; wrote {args.output}")


if __name__ == "__main__":
    main()
