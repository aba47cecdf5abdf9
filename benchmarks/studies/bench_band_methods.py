"""Question: does the ``cpu`` preset's 16 kHz band change CIGN, fine-tuning and joint training in full runs?
Answer: it lifts the joint upper bound's audio and leaves CIGN's audio-visual accuracy within seed noise.
Results: ``benchmarks/studies/results/audio_8k/`` against ``benchmarks/results/audio_16k/``.

CIGN, fine-tuning and joint training with the ``cpu`` preset's audio at another band,
on the machine that ran the current preset's rows, so the two bands are compared on one CPU.

``--band 8k`` is the preset's former spec (8 kHz, n_fft 256, hop 80; ``bench_audio_probe.SPECS``).
The preset is replaced by that spec for this process, avdigits' clips (``--clips-dir``) are linked,
not generated again, into ``runs/band-BAND-data`` and prepared there with it, and
``cign-experiment methods --rows cign,finetune,joint`` runs there; tables in
``benchmarks/studies/results/audio_BAND/``. The current spec's rows: ``cign-experiment methods --rows
cign,finetune,joint --runs runs/exp16k --out benchmarks/results/audio_16k``.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bench_audio_probe import SPECS, link_clips
from cign_runtime import spec as spec_module
from cign_train.cli.experiment import main as experiment

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--band", choices=sorted(SPECS), default="8k")
    ap.add_argument("--clips-dir", type=Path, default=Path("data"), help="data dir holding the generated avdigits")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    data = Path("runs") / f"band-{args.band}-data"
    link_clips(data, args.clips_dir)
    spec_module.PRESETS["cpu"] = dataclasses.replace(spec_module.PRESETS["cpu"], **SPECS[args.band])
    experiment(["methods", "--rows", "cign,finetune,joint", "--seeds", args.seeds, "--data-dir", str(data),
                "--runs", f"runs/band-{args.band}", "--out", str(RESULTS / f"audio_{args.band}")])


if __name__ == "__main__":
    main()
