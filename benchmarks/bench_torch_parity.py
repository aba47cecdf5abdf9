"""The torch backends against onnxruntime fp32 on real clips: how far each precision and mode moves the outputs.

For every export given (default: the three seeds' tokens-as-input exports of ``make bench-enroll``,
trained avdigits models), every clip of its test split goes through onnxruntime fp32 (the reference)
and through the torch backend at each precision (fp32, fp16, bf16) and mode (torch-cpu: eager;
torch-cuda: eager, graph), batch 1 on CUDA (as cign-live calls it), batches of 16 on the
CPU. Per configuration: max |difference| of each output, top-1 agreement of each output, and the
audio-visual accuracy of both. ``cign_export.parity.TORCH_TOLERANCES`` is set from these numbers.

Writes ``benchmarks/results/torch_parity_<device>.json`` (``--output``) with the machine named and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import machine
from cign_export.parity import TORCH_TOLERANCES, accuracy, compare, load_samples, open_store
from cign_runtime import manifest as mf
from cign_runtime.backends import TORCH_PRECISIONS, open_model
from cign_train.checkpoint import TaskCheckpoint

RESULTS = Path(__file__).parent / "results"
DEFAULT_EXPORTS = [Path(f"runs/bench-enroll/seed{s}/export") for s in range(3)]
MODES = {"cpu": ("eager",), "cuda": ("eager", "graph")}


def outputs(model, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    parts = [model.predict(feeds[mf.FRAME][i : i + batch], feeds[mf.SPECTROGRAM][i : i + batch])
             for i in range(0, len(feeds[mf.FRAME]), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in mf.OUTPUTS}


def measure(export: Path, device: str, threads: int, data_dir: Path | None) -> list[dict]:
    manifest = mf.Manifest.load(export)
    ckpt = TaskCheckpoint.load(manifest.checkpoint["path"])
    samples = load_samples(open_store(ckpt.settings, data_dir), manifest.classes[: manifest.n_classes()], "test")
    with open_model(export, "ort-cpu", "fp32", threads=threads) as ref_model:
        ref = outputs(ref_model, samples.feeds, 16)
    rows = []
    batch = 1 if device == "cuda" else 16
    for precision in TORCH_PRECISIONS:
        for mode in MODES[device]:
            started = time.perf_counter()
            with open_model(export, f"torch-{device}", precision, threads=threads, mode=mode) as model:
                got = outputs(model, samples.feeds, batch)
            rows.append({"export": str(export), "classes": manifest.n_classes(), "clips": len(samples),
                         "precision": precision, "mode": mode, "batch": batch, "seconds": time.perf_counter() - started,
                         "outputs": compare(got, ref), "accuracy": accuracy(got, samples.labels)["audio_visual"],
                         "accuracy_fp32_onnx": accuracy(ref, samples.labels)["audio_visual"]})
            print(f"{export} {precision} {mode}: max |diff| "
                  f"{max(v['max_abs_diff'] for v in rows[-1]['outputs'].values()):.2e}", flush=True)
    return rows


def table(result: dict) -> str:
    lines = [f"torch-{result['device']} against onnxruntime fp32, {machine.label(result['machine'])}"
             + (f", GPU {result['machine']['gpu']['name']}" if result["machine"].get("gpu") else ""), "",
             "| precision | mode | tolerance | max diff p_audio / p_visual / p_av (worst export) | top-1 agreement p_audio / p_visual / p_av (lowest) | AV accuracy torch / onnx (mean) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (precision, mode), rows in group(result["rows"]).items():
        diff = " / ".join(f"{max(r['outputs'][o]['max_abs_diff'] for r in rows):.1e}" for o in mf.OUTPUTS)
        agree = " / ".join(f"{100 * min(r['outputs'][o]['top1_agreement'] for r in rows):.1f} %" for o in mf.OUTPUTS)
        acc = (f"{np.mean([r['accuracy'] for r in rows]):.1f} / {np.mean([r['accuracy_fp32_onnx'] for r in rows]):.1f}")
        lines.append(f"| {precision} | {mode} | {TORCH_TOLERANCES[precision]:g} | {diff} | {agree} | {acc} |")
    return "\n".join(lines) + "\n"


def group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["precision"], r["mode"]), []).append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, nargs="+", default=DEFAULT_EXPORTS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, help="where the exports' prepared store is [default: their runs']")
    ap.add_argument("--output", type=Path, help="[default: benchmarks/results/torch_parity_<device>.json]")
    args = ap.parse_args()
    missing = [str(e) for e in args.export if not (e / mf.FILENAME).is_file()]
    if missing:
        raise SystemExit(f"no export at {missing}: make bench-enroll writes the default ones, or pass --export DIR")
    rows = [r for export in args.export for r in measure(export, args.device, args.threads, args.data_dir)]
    result = {"machine": machine.describe(args.threads), "device": args.device, "tolerances": TORCH_TOLERANCES,
              "rows": rows}
    out = args.output or RESULTS / f"torch_parity_{args.device}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
