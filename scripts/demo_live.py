"""``make demo``'s last step: ``cign-live`` headless on avdigits test clips, then its accuracy and latency.

Runs the real CLI (``cign-live``, through this interpreter: no PATH needed) once per clip (video file as camera, its audio as microphone, ``--no-realtime``,
hop 0.5 s), two clips per class by default. A clip's answer is the prediction at media time 3.5 s,
whose window is the clip's centred 3 s analysis window (the one training saw). Prints the clip
table, top-1 accuracy of p_av and of p_audio / p_visual against chance, and the latency summary
of all predictions together; writes the pooled latency log to ``OUT/latency.jsonl`` and its
histogram next to it.

    python scripts/demo_live.py EXPORT_DIR DATA_DIR [--per-class 2] [--out exports/live-demo]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from cign_runtime import latency

ANSWER_AT = 3.5  # media time (s) whose 3 s window is the centred analysis window of a 4 s clip


def test_clips(root: Path, per_class: int) -> list[tuple[Path, str]]:
    with open(root / "avdigits.csv", newline="") as f:
        rows = [r for r in csv.reader(f) if r[3] == "test"]
    picked: dict[str, list[Path]] = {}
    for youtube_id, start, label, _ in rows:
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(root / "clips" / f"{youtube_id}_{int(start):06d}.mp4")
    return [(clip, label) for label, paths in picked.items() for clip in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("exports/live-demo"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clips = test_clips(args.data_dir / "avdigits", args.per_class)
    records, rows = [], []
    for i, (clip, label) in enumerate(clips):
        log = args.out / f"clip{i}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "cign_runtime.cli", "--model", str(args.export), "--camera", str(clip), "--mic", str(clip),
                               "--headless", "--no-realtime", "--hop", "0.5", "--latency-log", str(log)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"cign-live failed on {clip}:\n{proc.stderr[-3000:]}")
        if i == 0:
            print(proc.stderr.splitlines()[0])  # the model line: backend and precision
        at = {x["media_time"]: x for x in map(json.loads, proc.stdout.splitlines())}[ANSWER_AT]
        tops = {key: max(at["top"], key=lambda t: t[key])["class"] for key in ("p_av", "p_audio", "p_visual")}
        rows.append((clip.name, label, at["label"], tops))
        records += [r for r in latency.read_log(log) if "index" in r]
    for r in records:  # pooled: one index sequence, one wall-time span per clip would overlap
        r.pop("counts", None)
    pooled = args.out / "latency.jsonl"
    pooled.write_text("".join(json.dumps(r) + "\n" for r in records))

    print("\n| clip | class | answer (calibrated) | top p_av | top p_audio | top p_visual |\n|---|---|---|---|---|---|")
    for name, label, answer, tops in rows:
        print(f"| {name} | {label} | {answer} | {tops['p_av']} | {tops['p_audio']} | {tops['p_visual']} |")
    n = len(rows)
    print(f"\ntop-1 over {n} test clips at media time {ANSWER_AT} s (chance {100 / 10:.0f} %):")
    for key in ("p_av", "p_audio", "p_visual"):
        right = sum(tops[key] == label for _, label, _, tops in rows)
        print(f"  {key:<9} {right}/{n} = {100 * right / n:.1f} %")
    print(f"\nlatency of all {len(records)} predictions ({n} cign-live runs stepping files: ages are 0; wall time and "
          "predictions/s span the runs and their start-ups):")
    print(latency.summarize(pooled))


if __name__ == "__main__":
    main()
