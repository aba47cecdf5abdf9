"""Data pipeline throughput: PyAV decoding (clips/s) and prepared-store loading (samples/s).

Rows:
* decode, 1 process: ``decode_clip`` over avdigits clips (4 s, 128x128, 22.05 kHz mono) and over
  VGGSound-like clips made here (10 s, 640x360 at 25 fps, 44.1 kHz), paper preset.
* prepare, N workers: the whole ``cign-prepare`` path (decode + torch log spectrogram + store).
* loader: ``batch_loader`` over a paper-preset store (224x224 frames, 257x300 spectrograms),
  batch 128, 0 and 2 worker processes, warm page cache. Goal: >= 3,000 samples/s with 2 workers.

Writes ``--output`` (``benchmarks/results/data.json``) with the CPU named and prints a table. Ratios from one run are what to
quote; absolute numbers vary with the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import machine
from cign_runtime.spec import get_preset
from cign_train.data.avdigits.media import write_mp4
from cign_runtime.decode import decode_clip
from cign_train.data.definitions import Candidate
from cign_train.data.ingest import prepare_dataset
from cign_train.data.prepare import prepare_store
from cign_train.data.store import PreparedStore
from cign_train.throughput import loader_rate

RESULTS = Path(__file__).parent / "results"
GOAL_SAMPLES_PER_S = 3000


def vggsound_like_clips(folder: Path, n: int) -> list[Path]:
    """10 s 640x360 25 fps clips with 44.1 kHz audio: the shape of a VGGSound download."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:360, 0:640]
    base = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    paths = []
    for i in range(n):
        frames = np.stack([np.roll(base, 4 * t, axis=1) for t in range(250)])  # panning: real motion
        audio = (0.1 * rng.standard_normal(441000)).astype(np.float32)
        path = folder / f"vgglike{i:03d}_000000.mp4"
        write_mp4(path, frames, 25, audio, 44100)
        paths.append(path)
    return paths


def time_decode(paths: list[Path], spec) -> float:
    start = time.perf_counter()
    for p in paths:
        decode_clip(p, spec)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--decode-clips", type=int, default=200)
    ap.add_argument("--vgg-clips", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULTS / "data.json", help="e.g. data_avx512.json for a second CPU")
    args = ap.parse_args()
    paper = get_preset("paper")
    rows = []

    cpu_report = prepare_dataset("avdigits", args.data_dir, preset="cpu", progress=False)
    store = PreparedStore(cpu_report.root)
    clips_dir = args.data_dir / "avdigits" / "clips"
    clips = sorted(clips_dir.glob("*.mp4"))[: args.decode_clips]
    rows.append(("decode avdigits clip, 1 process", "clips/s", time_decode(clips, paper)))
    with tempfile.TemporaryDirectory() as tmp:
        vgg = vggsound_like_clips(Path(tmp), args.vgg_clips)
        rows.append(("decode VGGSound-like 10 s 360p clip, 1 process", "clips/s", time_decode(vgg, paper)))

    paper_root = args.data_dir / "avdigits" / "prepared" / "paper"
    candidates = [Candidate(i, str(clips_dir / f"{i}.mp4"), store.classes[l], s)
                  for i, l, s in zip(store.ids, store.labels, store.splits)]
    shutil.rmtree(paper_root, ignore_errors=True)  # a finished store would be confirmed, not prepared: time a fresh one
    start = time.perf_counter()
    report = prepare_store(paper_root, "avdigits", paper, store.classes, candidates, workers=args.workers, progress=False)
    rows.append((f"prepare avdigits, paper preset, {args.workers} workers", "clips/s",
                 report.stored / (time.perf_counter() - start)))

    paper_store = PreparedStore(paper_root)
    for workers in (0, args.workers):
        rate = loader_rate(paper_store, 128, workers, args.epochs)
        rows.append((f"loader 224px + 257x300, batch 128, {workers} workers", "samples/s", rate))

    loader_speed = rows[-1][2]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>10}  unit")
    for name, unit, value in rows:
        print(f"{name.ljust(width)}  {value:10.1f}  {unit}")
    print(f"loader goal >= {GOAL_SAMPLES_PER_S} samples/s: {'met' if loader_speed >= GOAL_SAMPLES_PER_S else 'NOT met'}"
          f" ({loader_speed / GOAL_SAMPLES_PER_S:.2f}x the goal)")
    host = machine.describe()
    print(f"on {machine.label(host)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": host,
        "store_samples": len(paper_store),
        "rows": [{"measure": n, "unit": u, "value": round(v, 2)} for n, u, v in rows],
        "loader_goal_samples_per_s": GOAL_SAMPLES_PER_S,
    }
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
