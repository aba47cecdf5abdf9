"""On-device enrolment against cign-train on the same shots (avdigits, cpu preset, 3 seeds).

Per seed: the default CIGN run stopped after its fourth task (8 classes; ``cign-train --stop-after 3``),
exported with the token table as an input (fp32 and int8-cpu). For N in 1, 3, 5, 10, ``cign-enroll`` (a
subprocess in which torch cannot be imported; wall time and peak RSS) enrols the two remaining digits
one after the other, each from the N training clips that ``cign-train --max-per-class N`` would pick.
References on the same seed: the run's fifth task trained by cign-train on those N clips per class (the
stopped run resumed with ``max_per_class`` N; the usual buffer; at N 5, the goals' N), and on all of its
training clips.

On test (argmax of p_av over all classes): new classes' accuracy, old classes' accuracy before and after,
false accepts (old-class clips whose top-1 is a new class). ``--sweep`` scores a grid of fit options on
val (seed 0, N 5; the val clips the export keeps as exemplar features left out), from which
``cign_runtime.enroll.FitOptions``' defaults were chosen; test is not read.

Hot swap: a running ``cign-live`` (file inputs at 1x) while an enrolled version is written beside its
export; the intervals between predictions around the swap against the hop.

Writes ``benchmarks/results/enroll.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import machine
from cign_export.exporter import Exporter, ExportOptions
from cign_export.graph import ExportGraph
from cign_export.parity import Samples, load_samples, run_eager, run_session
from cign_runtime import enroll as en
from cign_runtime import isa
from cign_runtime.confidence import known
from cign_runtime import manifest as mf
from cign_train import checkpoint as ck
from cign_train.experiments import mean_std
from cign_train.settings import TrainSettings, preset_settings
from cign_train.trainer import Trainer, make_plan, train_indices

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-enroll"
SHOTS = (1, 3, 5, 10)
#: N of the cign-train reference on the same clips: the goals' N (each costs a training run per seed).
REFERENCE_SHOTS = (5,)
SEEDS = (0, 1, 2)
STOP_AFTER = 3  # tasks 0-3: 8 of avdigits' 10 classes
PRECISIONS = ("fp32", "int8-cpu")
#: The --sweep grid (val, seed 0, N 5).
GRID = {"loss": en.LOSSES, "positive_weight": (0.1, 0.2, 0.3), "init": en.INITS}


def settings(seed: int) -> TrainSettings:
    """``cign-train --seed SEED``'s settings (avdigits, the cpu preset)."""
    return preset_settings("cpu", dataset="avdigits", data_dir=str(ROOT / "data"), seed=seed)


def base_run(seed: int) -> Path:
    """The default run of ``seed`` stopped after task STOP_AFTER (reused when there)."""
    run = WORK / f"seed{seed}" / "base"
    if not ck.task_path(run, STOP_AFTER).is_file():
        Trainer(settings(seed), run, progress=False).run(resume=(run / "config.json").is_file(), stop_after=STOP_AFTER)
    return run


def reference(seed: int, shots: int | None) -> Path:
    """The base run's task STOP_AFTER + 1 trained by cign-train on ``shots`` clips per new class (None: all)."""
    run = WORK / f"seed{seed}" / (f"train-{shots}shot" if shots else "train-all")
    if ck.task_path(run, STOP_AFTER + 1).is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    base = base_run(seed)
    run.mkdir(parents=True)
    for f in base.iterdir():
        if f.name.startswith("task_") or f.name in ("config.json", "last.pt", "metrics.json", "steps.jsonl"):
            shutil.copy2(f, run / f.name)
    s = dataclasses.replace(settings(seed), max_per_class=shots)  # tasks 0-3 are trained already: it caps task 4
    (run / "config.json").write_text(json.dumps(s.to_dict(), indent=1))
    Trainer(s, run, progress=False).run(resume=True)
    return run


def export(seed: int) -> Path:
    out = WORK / f"seed{seed}" / "export"
    if not (out / mf.FILENAME).is_file():
        Exporter(base_run(seed), STOP_AFTER, out, ExportOptions(precisions=PRECISIONS, tokens_as_input=True))()
    return out


def shot_clips(seed: int, new_class: int, n: int) -> list[str]:
    """The clip files of the ``n`` training clips of model class ``new_class`` that cign-train picks."""
    plan = make_plan(settings(seed))
    idx = train_indices(plan, [new_class], n, seed)
    clips = ROOT / "data" / "avdigits" / "clips"
    return [str(clips / f"{plan.store.ids[i]}.mp4") for i in idx]


def scores(p_av: np.ndarray, columns: list[str], truth: list[str], new: list[str], confidence=None) -> dict:
    """Accuracy (%) of new- and old-class clips, and new-class false accepts on old-class clips (%); with the
    export's confidence rule, the share of new-class clips named right and answered (not "no known source")."""
    pred = np.asarray(columns)[p_av.argmax(1)]
    truth = np.asarray(truth)
    is_new = np.isin(truth, new)
    pct = lambda x: round(100 * float(np.mean(x)), 2) if len(x) else None  # noqa: E731
    out = {"new": pct(pred[is_new] == truth[is_new]), "old": pct(pred[~is_new] == truth[~is_new]),
           "false_accepts": pct(np.isin(pred[~is_new], new))}
    if confidence is not None:
        answered = known(p_av, confidence.temperature, confidence.threshold)
        out["new_answered"] = pct((pred == truth)[is_new] & answered[is_new])
    return out


def score_export(root: Path, precision: str, samples, truth: list[str], new: list[str]) -> dict:
    manifest = mf.Manifest.load(root)
    session = ort.InferenceSession(str(root / manifest.artefact("onnx", precision).path), providers=["CPUExecutionProvider"])
    table = np.load(root / manifest.artefact("tokens", task=manifest.task).path)
    return scores(run_session(session, samples.feeds, tokens=table)["p_av"], manifest.classes, truth, new,
                  manifest.confidence)


def score_run(run: Path, samples, truth: list[str], new: list[str]) -> dict:
    saved = ck.TaskCheckpoint.load(ck.task_path(run, STOP_AFTER + 1))
    return scores(run_eager(ExportGraph(saved.build_model(), saved.spec), samples.feeds)["p_av"], saved.classes, truth, new)


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set of a running process's address space (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def enroll_cli(export_dir: Path, name: str, clips: list[str], options: list[str], kind: str = "native") -> tuple[Path, dict]:
    """``cign-enroll`` in a subprocess that cannot import torch: the new version and its costs (wall time,
    time inside the process, the fit's time, peak RSS) and the graphs' re-checks. ``kind``: the instruction set
    (``cign_runtime.isa``: ``avx2`` masks AVX-512, VNNI and AMX)."""
    env = isa.environ(kind, torchless_env())
    logs = WORK / "enroll.out", WORK / "enroll.err"
    start = time.perf_counter()
    peak_kb = 0
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cign_runtime.enroll_cli", str(export_dir), "--name", name, *clips,
                                 *options], stdout=out, stderr=err, env=env)
        while proc.poll() is None:  # VmHWM: the peak of the enrolment's own address space (a fork's ru_maxrss
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))  # would count this torch-laden parent's pages)
            time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cign-enroll failed: {logs[1].read_text()}")
    lines = logs[0].read_text().strip().splitlines()
    version = Path(lines[-1])
    record = mf.Manifest.load(version).enrolled[-1]
    seconds = float(re.search(r" shots in ([0-9.]+) s", lines[-2])[1])  # the CLI's line: decoding to written version
    return version, {"wall_s": round(wall, 3), "in_process_s": seconds, "fit_s": record["fit"]["seconds"],
                     "peak_rss_mb": round(peak_kb / 1024, 1), "checks": record["checks"]}


def enrol_both(seed: int, n: int, options: list[str] | None = None) -> tuple[Path, list[dict]]:
    """Enrol the two new classes from ``n`` shots each into the seed's export: the final version and per-class costs."""
    root = export(seed)
    for _, old in en.revisions(root)[1:]:
        shutil.rmtree(old)
    classes = mf.Manifest.load(root).classes
    store_classes = make_plan(settings(seed)).class_names
    new = [c for c in store_classes if c not in classes]
    costs = []
    version = root
    for name in new:
        version, cost = enroll_cli(version, name, shot_clips(seed, store_classes.index(name), n), options or [])
        costs.append(cost)
    return version, costs


def torchless_env() -> dict:
    fake = WORK / "torchless"
    (fake / "torch").mkdir(parents=True, exist_ok=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked: the runtime must not need it')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}


def swap_gap(seed: int, hop: float = 0.25, before: float = 6.0, after: float = 4.0) -> dict:
    """A running ``cign-live`` (a test clip as camera and microphone, looped at 1x, torch blocked) while a version
    with one more class is written beside its export: the intervals between consecutive predictions' start
    times, before and around the swap, against the hop."""
    from cign_runtime import latency

    root = export(seed)
    for _, old in en.revisions(root)[1:]:
        shutil.rmtree(old)
    plan = make_plan(settings(seed))
    clip = str(ROOT / "data" / "avdigits" / "clips" / f"{plan.store.ids[plan.store.indices('test')[0]]}.mp4")
    log = WORK / "swap-latency.jsonl"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "cign_runtime.cli", "--model", str(root), "--camera", clip, "--mic", clip,
                             "--loop", "--headless", "--hop", str(hop), "--latency-log", str(log), "--max-seconds", "300"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=torchless_env())
    time.sleep(before)
    names = mf.Manifest.load(root).classes
    new = next(c for c in plan.class_names if c not in names)
    shots = en.load_shots(shot_clips(seed, plan.class_names.index(new), 5), mf.Manifest.load(root).spec).accepted
    version, _ = en.enroll(root, new, shots)  # in this process, beside the running one
    time.sleep(after)
    proc.terminate()  # cign-live stops on SIGTERM and writes its log
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"cign-live failed: {err[-2000:]}")
    records = [r for r in latency.read_log(log) if "index" in r]
    swapped = next(i for i, r in enumerate(records) if "swap" in r)
    t = np.array([r["t"] for r in records])
    gaps = np.diff(t)
    around = gaps[max(0, swapped - 4): swapped + 4]
    return {"hop_s": hop, "predictions": len(records), "swap_index": swapped, "to_revision": records[swapped]["revision"],
            "session": records[swapped]["swap"]["session"], "max_gap_before_s": round(float(gaps[: swapped - 4].max()), 3),
            "max_gap_around_swap_s": round(float(around.max()), 3), "max_gap_s": round(float(gaps.max()), 3),
            "version": version.name}


def timing(seed: int = 0, n: int = 5, repeats: int = 3) -> dict:
    """One class enrolled from ``n`` shots, ``repeats`` times per instruction set, on an otherwise idle machine:
    seconds inside the torch-free process (decoding to written version) and its peak RSS."""
    root = export(seed)
    plan = make_plan(settings(seed))
    new = next(c for c in plan.class_names if c not in mf.Manifest.load(root).classes)
    clips = shot_clips(seed, plan.class_names.index(new), n)
    out = {"seed": seed, "shots": n, "kinds": {}}
    for kind in isa.ISAS:
        if isa.unavailable(kind):
            out["kinds"][kind] = {"skipped": isa.unavailable(kind)}
            continue
        runs = []
        for _ in range(repeats):
            for _, old in en.revisions(root)[1:]:
                shutil.rmtree(old)
            runs.append(enroll_cli(root, new, clips, [], kind)[1])
        out["kinds"][kind] = {k: [r[k] for r in runs] for k in ("in_process_s", "wall_s", "fit_s", "peak_rss_mb")}
        print(f"timing {kind}: {out['kinds'][kind]}", flush=True)
    return out


def evaluate_seed(seed: int) -> dict:
    plan = make_plan(settings(seed))
    names = plan.class_names
    old = mf.Manifest.load(export(seed)).classes
    new = [c for c in names if c not in old]
    test = load_samples(plan.store, names, "test")
    truth = [names[k] for k in test.labels]
    exemplars = mf.Manifest.load(export(seed)).artefact("exemplars")
    out = {"new_classes": new, "exemplars_bytes": exemplars.bytes, "before": {p: score_export(export(seed), p, test, truth, new) for p in PRECISIONS},
           "train_all": score_run(reference(seed, None), test, truth, new), "shots": {}}
    for n in SHOTS:
        version, costs = enrol_both(seed, n)
        out["shots"][str(n)] = {"enroll": {p: score_export(version, p, test, truth, new) for p in PRECISIONS}, "cost": costs}
        if n in REFERENCE_SHOTS:
            out["shots"][str(n)]["train_same_shots"] = score_run(reference(seed, n), test, truth, new)
        print(f"seed {seed} N {n}: {out['shots'][str(n)]}", flush=True)
    return out


def sweep() -> dict:
    """The grid on val, seed 0, N 5, in-process through cign-enroll's API. The val clips the export keeps as
    exemplar features (its negatives) are left out of the scoring."""
    seed, n = 0, 5
    plan = make_plan(settings(seed))
    names = plan.class_names
    root = export(seed)
    old = mf.Manifest.load(root).classes
    new = [c for c in names if c not in old]
    val = load_samples(plan.store, names, "val")
    held = np.isin(val.indices, json.loads((root / "report.json").read_text())["exemplars"]["store_indices"])
    val = Samples(val.split, val.indices[~held], {k: v[~held] for k, v in val.feeds.items()}, val.labels[~held])
    truth = [names[k] for k in val.labels]
    rows = []
    for values in itertools.product(*GRID.values()):
        for _, v in en.revisions(root)[1:]:
            shutil.rmtree(v)
        opt = en.FitOptions(**dict(zip(GRID, values)))
        version = root
        for name in new:
            shots = en.load_shots(shot_clips(seed, names.index(name), n), mf.Manifest.load(root).spec).accepted
            version, _ = en.enroll(version, name, shots, opt)
        rows.append({**dict(zip(GRID, values)), **score_export(version, "fp32", val, truth, new)})
        print(rows[-1], flush=True)
    return {"split": "val", "seed": seed, "shots": n, "clips": len(val.labels), "rows": rows}


def summary(per_seed: dict) -> dict:
    """Mean and std over seeds of every number, per N."""
    def ms(values):
        m, s = mean_std([v for v in values if v is not None])
        return {"mean": round(m, 2), "std": round(s, 2)}

    seeds = list(per_seed.values())
    out = {"before": {p: {k: ms([s["before"][p][k] for s in seeds]) for k in ("old",)} for p in PRECISIONS},
           "train_all": {k: ms([s["train_all"][k] for s in seeds]) for k in ("new", "old", "false_accepts")}}
    for n in SHOTS:
        row = {"enroll": {p: {k: ms([s["shots"][str(n)]["enroll"][p][k] for s in seeds])
                              for k in ("new", "old", "false_accepts", "new_answered")}
                          for p in PRECISIONS},
               **({"train_same_shots": {k: ms([s["shots"][str(n)]["train_same_shots"][k] for s in seeds])
                                       for k in ("new", "old", "false_accepts")}} if n in REFERENCE_SHOTS else {}),
               "enroll_s": ms([c["in_process_s"] for s in seeds for c in s["shots"][str(n)]["cost"]]),
               "enroll_wall_s": ms([c["wall_s"] for s in seeds for c in s["shots"][str(n)]["cost"]]),
               "peak_rss_mb": max(c["peak_rss_mb"] for s in seeds for c in s["shots"][str(n)]["cost"])}
        out[str(n)] = row
    return out


def table(doc: dict) -> str:
    s = doc["summary"]
    f = lambda d: f"{d['mean']:.1f} ± {d['std']:.1f}"  # noqa: E731
    lines = [f"On-device enrolment, avdigits test, seeds {doc['seeds']}, {doc['machine_label']}",
             f"old classes before: fp32 {f(s['before']['fp32']['old'])}; cign-train on all clips: new {f(s['train_all']['new'])}, "
             f"old {f(s['train_all']['old'])}",
             "N | enrol fp32 new / old / false acc. | enrol int8-cpu new / old | cign-train same N new / old | enrol s | peak MB"]
    for n in SHOTS:
        r = s[str(n)]
        e, q, t = r["enroll"]["fp32"], r["enroll"]["int8-cpu"], r.get("train_same_shots")
        ref = f"{f(t['new'])} / {f(t['old'])}" if t else "-"
        lines.append(f"{n} | {f(e['new'])} / {f(e['old'])} / {f(e['false_accepts'])} | {f(q['new'])} / {f(q['old'])} | "
                     f"{ref} | {f(r['enroll_s'])} | {r['peak_rss_mb']:.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="Score the fit-option grid on val (seed 0, N 5) and exit.")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--fresh", action="store_true", help="Measure seeds whose numbers are kept already again.")
    args = ap.parse_args()
    info = machine.describe()
    RESULTS.mkdir(exist_ok=True)
    if args.sweep:
        doc = {"machine": info, "machine_label": machine.label(info), "date": time.strftime("%Y-%m-%d"), "grid": GRID, **sweep()}
        (RESULTS / "enroll_sweep.json").write_text(json.dumps(doc, indent=1))
        return
    per_seed = {}
    for seed in args.seeds:  # a seed's numbers are kept beside its runs; --fresh measures them again
        cached = WORK / f"seed{seed}" / "enroll.json"
        if args.fresh or not cached.is_file():
            cached.write_text(json.dumps(evaluate_seed(seed), indent=1))
        per_seed[seed] = json.loads(cached.read_text())
    doc = {"machine": info, "machine_label": machine.label(info), "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds,
           "shots": list(SHOTS), "reference_shots": list(REFERENCE_SHOTS), "split": "test", "timing": timing(args.seeds[0]), "swap": swap_gap(args.seeds[0]),
           "fit_options": dataclasses.asdict(en.FitOptions()), "per_seed": per_seed, "summary": summary(per_seed)}
    (RESULTS / "enroll.json").write_text(json.dumps(doc, indent=1))
    print(table(json.loads(json.dumps(doc))))


if __name__ == "__main__":
    main()
