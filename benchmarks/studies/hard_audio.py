"""Question: with one audio location (P = 1), what does hard assignment do to the audio branch that soft assignment does not?
Answer: it puts the sound on one class slot, but that slot is about as often the right class as chance; the
audio head ranks by phi_a's tokens under both assignments and its accuracy stays within the seeds' spread.
Table 5's Hard-Softmax loss is the visual head's. Results: ``benchmarks/studies/results/hard_audio_avdigits.json``.

Eq 7 with P = 1: under soft assignment every class slot receives the same pooled audio feature
u = W_o W_v f_a_hat, so g_a,i - c_hat_a,i is one vector for all i and adds one constant to every
audio logit (the heads FC(g_i) are shared and linear): the audio ranking comes from phi_a's
contextualised tokens c_hat_a,i alone. Under hard assignment only the chosen slot receives u and
every other slot's g_a,i is exactly its token. This study measures that on the trained models of
``cign-experiment depth`` (the default CIGN runs and the ``hard`` row, task 5 checkpoints, test
split, all ten classes): audio, visual and audio-visual (p_a * p_v) accuracy, the spread of ||g_a,i - c_hat_a,i|| over the slots, how
often the audio prediction is the slot that received the sound, the accuracy of that slot as a
classifier, and the accuracy of the token-only logits FC(c_hat_a,i). Mean +- std over the seeds;
writes the JSON with the CPU named.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from cign_train import checkpoint as ck
from cign_train.data.loader import batch_loader
from cign_train.experiments import EXPERIMENTS, Sweep, finished
from cign_train.model.cign import predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine.py
import machine as bench_machine  # noqa: E402

ROWS = ("depth1", "hard")  # soft assignment (the default run) and Hard-Softmax, the preset's depth


@torch.no_grad()
def probe(path: Path, sweep: Sweep, row, seed: int) -> dict[str, float]:
    """The audio branch of the run's last task model on every test clip of the seen classes."""
    from cign_train.trainer import Trainer

    trainer = Trainer(sweep.settings(row, seed), path, progress=False)
    last = len(trainer.plan.task_classes) - 1
    model = ck.TaskCheckpoint.load(ck.task_path(path, last)).build_model().eval()
    captured = {}
    hook = model.group_a.register_forward_hook(lambda mod, args, out: captured.update(c_hat=args[1], g=out[0], a=out[1]))
    classes = [c for task in trainer.plan.task_classes for c in task]
    idx = trainer.plan.split_indices("test", classes)
    counts = {k: 0.0 for k in ("audio", "visual", "audio_visual", "slot_is_prediction", "slot", "tokens_only", "spread")}
    n = 0
    for batch in batch_loader(trainer.plan.store, idx, 64, shuffle=False, workers=0):
        x = trainer.inputs(batch)
        out = model(x.spectrograms, x.frames)
        pred = out.logits_a.argmax(dim=1)
        slot = captured["a"][:, 0].argmax(dim=1)  # (B,): the class slot the one audio location went to
        norms = (captured["g"] - captured["c_hat"]).norm(dim=-1)  # (B, K)
        tokens_only = model.head_a(captured["c_hat"]).squeeze(-1).argmax(dim=1)
        counts["audio"] += (pred == x.labels).sum().item()
        counts["visual"] += (out.logits_v.argmax(dim=1) == x.labels).sum().item()
        counts["audio_visual"] += (predict(out).p_av.argmax(dim=1) == x.labels).sum().item()
        counts["slot_is_prediction"] += (slot == pred).sum().item()
        counts["slot"] += (slot == x.labels).sum().item()
        counts["tokens_only"] += (tokens_only == x.labels).sum().item()
        # share of the audio feature's norm on its largest slot: 1 / K when spread evenly, 1 when on one slot
        counts["spread"] += (norms.max(dim=1).values / norms.sum(dim=1).clamp_min(1e-12)).sum().item()
        n += len(x.labels)
    hook.remove()
    return {k: 100 * v / n for k, v in counts.items()} | {"clips": n, "classes": len(classes)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hard_audio_avdigits.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    exp = EXPERIMENTS["depth"]
    sweep = Sweep("avdigits", None, a.data_dir, "cpu", seeds, a.runs, {})
    rows = {}
    for row in (r for r in exp.rows if r.key in ROWS):
        per_seed = {}
        for seed in seeds:
            path = sweep.path(row, seed)
            if not finished(path, sweep.settings(row, seed)):
                raise SystemExit(f"{path}: not finished (cign-experiment depth --rows {row.key} trains it)")
            per_seed[seed] = probe(path, sweep, row, seed)
            print(row.key, seed, {k: round(v, 1) for k, v in per_seed[seed].items()})
        keys = [k for k in per_seed[seeds[0]] if k not in ("clips", "classes")]
        rows[row.key] = {"label": row.label, "run": str(sweep.path(row, seeds[0])).replace("seed0", "seedS"),
                         "per_seed": per_seed,
                         "mean_std": {k: [statistics.fmean(p[k] for p in per_seed.values()),
                                          statistics.stdev(p[k] for p in per_seed.values()) if len(seeds) > 1 else 0.0]
                                      for k in keys}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"study": "hard_audio", "dataset": "avdigits", "preset": "cpu", "split": "test",
                                 "seeds": seeds, "machine": bench_machine.describe(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out} ({bench_machine.label(bench_machine.describe())})")


if __name__ == "__main__":
    main()
