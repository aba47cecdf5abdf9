#!/usr/bin/env python3
"""Every measured number of README.md, docs/*.md and benchmarks/studies/README.md, from the results' JSON.

A page holds generated blocks between markers, on their own lines (tables) or inline (a number in a
sentence)::

    <!-- report:NAME [ARG ...] -->
    ... written by this script ...
    <!-- /report:NAME -->

``python benchmarks/report.py`` rewrites every block from ``benchmarks/results/*.json`` and
``benchmarks/studies/results/*.json`` (``make report`` runs exactly that). ``--check`` writes nothing
and exits 1, naming each page and block whose text differs from what the JSON says, and each block
whose name is unknown or whose JSON file is missing. Prose outside the blocks carries no measured
number. Every generated table names its source file, the machine (``machine`` / ``environment`` of
the JSON, labelled as ``cign_runtime.bench.cpu_label`` does), the split and the seeds, and the date
where the JSON has one. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
STUDIES = "benchmarks/studies/results"
BLOCK = re.compile(r"<!-- report:(?P<name>[a-z0-9_]+)(?P<args>(?: [^>]*?)?) -->(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)
MODALITIES = ("audio", "visual", "audio_visual")
MOD_NAMES = {"audio": "audio", "visual": "visual", "audio_visual": "audio-visual"}


def pages() -> list[Path]:
    """The pages this script owns blocks in (repo-relative)."""
    docs = sorted(p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md"))
    return [Path("README.md"), *docs, Path("benchmarks/studies/README.md")]


class MissingResult(Exception):
    pass


@lru_cache(maxsize=None)
def load(rel: str) -> dict:
    path = ROOT / rel
    if not path.is_file():
        raise MissingResult(rel)
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- formatting

def pm(v, digits: int = 1, n: int = 2) -> str:
    """mean ± std from a [mean, std] pair (the mean alone for one seed), as cign_train.experiments.cell."""
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if n > 1 else f"{v[0]:.{digits}f}"


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def seeds_text(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def cpu_label(env: dict) -> str:
    """'CPU model (N cores; flags)', exactly as ``cign_runtime.bench.cpu_label`` (kept here: no numpy
    needed); files written before the CPU was recorded say so."""
    if "cpu" not in env:
        return f"CPU model not recorded ({env.get('cpus', '?')} cores)"
    masked = f", CPUID-masked to {env['cpu_isa']}" if env.get("cpu_isa", "native") != "native" else ""
    return f"{env['cpu']} ({env['cores']} cores; {' '.join(env.get('flags', [])) or 'no AVX2'}{masked})"


def short_cpu(env: dict) -> str:
    """'Intel Xeon, 2 cores, AMX' for table cells (the caption has the full label)."""
    if "cpu" not in env:
        return f"CPU not recorded, {env.get('cpus', '?')} cores"
    name = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", env["cpu"])
    name = re.sub(r"\s+", " ", name).strip()
    flags = env.get("flags", [])
    best = ("AMX" if any(x.startswith("amx") for x in flags) else "AVX-512 BF16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "flags not recorded")
    isa = env.get("cpu_isa", "native")
    held = f", held to {isa}" if isa != "native" else ""
    return f"{name}, {env.get('cores', '?')} cores, {best}{held}"


def gpu_label(d: dict) -> str:
    env = d.get("environment") or d.get("machine") or {}
    gpu = (env.get("gpu") or {}).get("name") if isinstance(env.get("gpu"), dict) else None
    return gpu or d.get("device") or env.get("device") or "GPU not recorded"


def machine_of(d: dict) -> dict:
    return d.get("machine") or d.get("environment") or d.get("host") or {}


def table(header, rows, align=None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class Ctx:
    """Where a block is written: links are relative to its page."""

    def __init__(self, page: Path):
        self.page = page

    def href(self, rel: str) -> str:
        return os.path.relpath(ROOT / rel, (ROOT / self.page).parent).replace(os.sep, "/")

    def link(self, rel: str, text: str | None = None) -> str:
        """A link to a result file, named by its path below the results folder."""
        name = text or re.sub(rf"^({STUDIES}|{RESULTS})/", "", rel)
        return f"[`{name}`]({self.href(rel)})"

    def source(self, rels, *parts: str) -> str:
        """The caption line: source files, then what they were measured on / over."""
        rels = [rels] if isinstance(rels, str) else rels
        files = ", ".join(self.link(r) for r in rels)
        return "_Source: " + files + ("; " + "; ".join(p for p in parts if p) if parts else "") + "._"


def spec_text(d: dict) -> str:
    """The preprocessing spec a result was measured with, from its JSON; the top-level experiment files
    predate the field and were measured with the ``cpu`` preset's former 8 kHz audio."""
    s = d.get("spec")
    if isinstance(s, dict):
        return (f"{s['name']} spec: {s['sample_rate'] / 1000:g} kHz audio, {s['n_mels']} x "
                f"{1 + round(s['sample_rate'] * s['clip_seconds'] / s['hop_length'])} log-mel, {s['frame_size']} px frames")
    return "cpu spec with its former 8 kHz audio (same 32 x 301 shape; the file predates the spec field)"


def exp_caption(ctx: Ctx, rel: str, split: str, extra: str = "") -> str:
    d = load(rel)
    seeds = d["seeds"]
    split = split if " " in split else f"{split} split"
    return ctx.source(rel, f"{d['dataset']}, `{d['preset']}` preset, {spec_text(d)}", split, seeds_text(seeds),
                      "mean ± std over seeds, %", cpu_label(d["machine"]), extra)


def nseeds(entry) -> int:
    return len(entry["runs"])


# --------------------------------------------------------------------------------------------- README

METHODS = f"{RESULTS}/experiment_methods_avdigits.json"
BASELINES = ("ewc", "lwf", "icarl", "il2m", "bic", "podnet", "ss_il", "l2p", "dualprompt")


def best_baseline(d: dict, split: str = "test") -> str:
    rows = {k: v for k, v in d["rows"].items() if k in BASELINES}
    return max(rows, key=lambda k: rows[k]["summary"][split]["audio_visual"]["average_accuracy_l2p"][0])


def lat_row(d: dict, precision: str, batch: int = 1, backend: str = "ort-cpu") -> dict | None:
    for r in d["rows"]:
        if r["backend"] == backend and r["precision"] == precision and r["batch"] == batch:
            return r
    return None


def gen_headline(ctx: Ctx) -> str:
    d = load(METHODS)
    s = lambda k: d["rows"][k]["summary"]["test"]["audio_visual"]  # noqa: E731
    best = best_baseline(d)
    rows = []
    for key, name in (("cign", "CIGN"), ("finetune", "fine-tuning (lower bound)"),
                      (best, f"best baseline: {d['rows'][best]['label']}"), ("joint", "joint training (upper bound)")):
        n = nseeds(d["rows"][key])
        rows.append([f"{name}: audio-visual Average Acc / Forgetting, %",
                     f"{pm(s(key)['average_accuracy_l2p'], n=n)} / {pm(s(key)['forgetting_l2p'], n=n)}",
                     f"avdigits, test, {seeds_text(d['seeds'])}; {short_cpu(d['machine'])}"])
    ea = load(f"{RESULTS}/export_accuracy.json")
    seeds = [int(re.search(r"seed(\d+)", r["run"]).group(1)) for r in ea["runs"]]
    for prec, name in (("fp32", "fp32"), ("int8-cpu", "INT8 (onnxruntime CPU recipe)")):
        acc = mean_std(r["accuracy"]["test"][prec]["audio_visual"] for r in ea["runs"])
        rows.append([f"exported CIGN, {name}: audio-visual accuracy, %", pm(acc),
                     f"avdigits, test, {seeds_text(seeds)}; {short_cpu(ea['machine'])}"])
    lat = load(f"{RESULTS}/latency_avdigits_avx512.json")
    for prec, name in (("fp32", "fp32"), ("int8-cpu", "INT8")):
        r = lat_row(lat, prec)
        rows.append([f"exported CIGN, {name}, batch 1: latency median / p99, ms", f"{f(r['median_ms'], 2)} / {f(r['p99_ms'], 2)}",
                     f"onnxruntime CPU, {lat['environment']['threads']} threads; {short_cpu(lat['environment'])}"])
    live = load(f"{RESULTS}/live_pipeline.json")
    e2e = live["summary"]["stages"]["end_to_end"]
    rows.append(["`cign-live` end to end (camera + microphone to prediction): p50 / p99, ms",
                 f"{f(e2e['p50'], 1)} / {f(e2e['p99'], 1)}",
                 f"{live['summary']['predictions']} predictions, INT8 graph; {short_cpu(live['machine'])}"])
    return "\n".join([
        table(["result", "value", "measured on"], rows, ["---", "---:", "---"]), "",
        ctx.source([METHODS, f"{RESULTS}/export_accuracy.json", f"{RESULTS}/latency_avdigits_avx512.json",
                    f"{RESULTS}/live_pipeline.json"],
                   f"continual rows: `cpu` preset, 5 tasks x 2 classes, {spec_text(d)}; export rows: task 4 of the "
                   "CIGN runs trained with the current `cpu` spec"),
    ])


def default_kind(kind: str, r: dict) -> str:
    precision = "bf16 autocast" if "bfloat16" in str(r.get("autocast")) else "fp32"
    what = {"native": "native", "avx2": "AVX2 only (CPUID mask)", "avx2-libs": "torch held to AVX2"}.get(kind, kind)
    return f"{what}, {precision}"


DEFAULT_RUNS = (f"{RESULTS}/default_run.json", f"{RESULTS}/default_run_avx512.json")
DEMO = f"{RESULTS}/demo.json"


def gen_demo_time(ctx: Ctx) -> str:
    d = load(DEMO)
    first_kind = next(iter(d["kinds"].values()))
    stages = list(first_kind["pass1"]["stages"])
    rows = []
    for kind, r in d["kinds"].items():
        first = r["pass1"]
        rows.append([default_kind(kind, r), *(f"{first['stages'][s]['seconds']:.0f} s" for s in stages),
                     f"**{first['seconds']:.0f} s**", "yes" if first["seconds"] <= d["budget_s"] else "**no**",
                     f"{r['pass2']['seconds']:.0f} s", f(r["final_accuracy"]["audio_visual"]), f(r["live_top1"]["p_av"])])
    return "\n".join([
        table(["instruction set, precision", *stages, "total", f"within {d['budget_s']} s", "second run",
               f"AV final ({first_kind['eval_split']}), %", "live p_av top-1, %"], rows,
              ["---"] + ["---:"] * (len(stages) + 1) + ["---"] + ["---:"] * 3), "",
        ctx.source(DEMO, "`make demo` after set-up, from an empty working folder, then once more (the second run reuses the "
                   f"training run), seed {first_kind['seed']}", cpu_label(d["machine"]), d["date"]),
    ])


# ----------------------------------------------------------------------------------- docs/results.md

PAPER = f"{RESULTS}/paper_vggsound100.json"


def paper_cell(table_name: str, key: str) -> str:
    v = load(PAPER)[table_name].get(key)
    return "–" if v is None else " / ".join(f(x, 2) for x in v)


def gen_methods(ctx: Ctx) -> str:
    d = load(METHODS)
    rows = []
    for key, e in d["rows"].items():
        s, n = e["summary"]["test"], nseeds(e)
        rows.append([e["label"]] + [f"{pm(s[m]['average_accuracy_l2p'], n=n)} / {pm(s[m]['forgetting_l2p'], n=n)}" for m in MODALITIES]
                    + [pm(s["audio_visual"]["diagonal_min"], n=n), paper_cell("table2", key)])
    return "\n".join([
        exp_caption(ctx, METHODS, "test", "Average Acc / Forgetting with L2P's definitions; the last column is the "
                    f"paper's own VGGSound-100 number ({ctx.link(PAPER)}), not measured here"), "",
        table(["method", "audio", "visual", "**audio-visual**", "just learned, worst task (AV)", "paper, VGGSound-100 (AV)"], rows),
    ])


def gen_methods_val(ctx: Ctx) -> str:
    d = load(METHODS)
    rows = []
    for e in d["rows"].values():
        s, n = e["summary"]["val"]["audio_visual"], nseeds(e)
        rows.append([e["label"], pm(s["average_accuracy_l2p"], n=n), pm(s["forgetting_l2p"], n=n), pm(s["average_accuracy"], n=n)])
    return "\n".join([exp_caption(ctx, METHODS, "val"), "",
                      table(["method", "AV Average Acc (L2P)", "AV Forgetting (L2P)", "AV average accuracy (AV-CIL)"], rows)])


SUMMARY_COLUMNS = (("average_accuracy", "average accuracy (AV-CIL)"), ("final_accuracy", "final accuracy"),
                   ("diagonal_mean", "just learned: mean"), ("diagonal_min", "just learned: worst task"),
                   ("forgetting_avcil", "forgetting (AV-CIL)"), ("forgetting_facil", "forgetting (FACIL)"),
                   ("forgetting_l2p", "forgetting (L2P)"))
CURRENT = f"{RESULTS}/audio_16k/experiment_methods_avdigits.json"


def gen_current(ctx: Ctx, split: str = "test") -> str:
    d = load(CURRENT)
    rows = []
    for e in d["rows"].values():
        for m in MODALITIES:
            rows.append([e["label"], MOD_NAMES[m]] + [pm(e["summary"][split][m][c], n=nseeds(e)) for c, _ in SUMMARY_COLUMNS])
    return "\n".join([exp_caption(ctx, CURRENT, split), "",
                      table(["method", "modality"] + [name for _, name in SUMMARY_COLUMNS], rows, ["---", "---"] + ["---:"] * 7)])


ABLATION = f"{RESULTS}/experiment_ablation_avdigits.json"


def gen_ablation(ctx: Ctx) -> str:
    d = load(ABLATION)
    rows = []
    for key, e in d["rows"].items():
        s, n = e["summary"]["test"], nseeds(e)
        av = s["audio_visual"]
        rows.append([e["label"], pm(av["average_accuracy_l2p"], n=n), pm(av["forgetting_l2p"], n=n), pm(av["average_accuracy"], n=n),
                     pm(av["diagonal_min"], n=n), pm(av["forgetting_avcil"], n=n), pm(s["visual"]["average_accuracy"], n=n),
                     pm(s["audio"]["average_accuracy"], n=n), paper_cell("table4", key)])
    return "\n".join([exp_caption(ctx, ABLATION, "test", "paper column: its Table 4 on VGGSound-100, not measured here"), "",
                      table(["row", "AV Average Acc (L2P)", "AV Forgetting (L2P)", "AV average (AV-CIL)", "just learned, worst task",
                             "AV forgetting (AV-CIL)", "visual average (AV-CIL)", "audio average (AV-CIL)", "paper (AV)"], rows)])


#: Diagnostic columns of an experiment's steps.jsonl medians: header and the keys shown in it.
DIAG_COLUMNS = (("gradient on the body / BCE's: KL", ("diag/grad_ratio_kl",)), ("token CE", ("diag/grad_ratio_ce",)),
                ("eq 9", ("diag/grad_ratio_ctl",)), ("eq 8's KL value", ("loss/kl",)),
                ("eq 9's p_pos audio / visual", ("diag/ctl_p_pos_a", "diag/ctl_p_pos_v")), ("eq 9's value", ("loss/ctl",)),
                ("share of eq 9's max on the anchor's own slot, audio / visual", ("diag/ctl_own_slot_a", "diag/ctl_own_slot_v")),
                ("teacher-student cosine of g at task end, audio / visual",
                 ("diag/teacher_student_cos_a", "diag/teacher_student_cos_v")))


def gen_diag(ctx: Ctx, rel: str) -> str:
    """The diagnostics an experiment recorded (median over a run's steps, mean over seeds), one column per
    DIAG_COLUMNS entry that experiment records; rows without eqs 8-9 (fine-tuning, joint) left out."""
    d = load(rel)
    recorded = {k for e in d["rows"].values() for k in e.get("diagnostics", {})}
    cols = [(h, keys) for h, keys in DIAG_COLUMNS if set(keys) <= recorded]

    def g(e, k):
        v = e.get("diagnostics", {}).get(k)
        return "–" if v is None else f"{v[0]:.3f}"

    rows = [[e["label"], *(" / ".join(g(e, k) for k in keys) for _, keys in cols)]
            for key, e in d["rows"].items() if key not in ("finetune", "joint")]
    return "\n".join([
        ctx.source(rel, "the same runs' `steps.jsonl` diagnostics: median over a run's steps, mean over "
                   + seeds_text(d["seeds"]), "train batches", cpu_label(d["machine"])), "",
        table(["row", *(h for h, _ in cols)], rows)])


DEPTH = f"{RESULTS}/experiment_depth_avdigits.json"


def gen_depth(ctx: Ctx) -> str:
    d = load(DEPTH)
    rows = []
    for key, e in d["rows"].items():
        s, n = e["summary"]["test"], nseeds(e)
        av = s["audio_visual"]
        rows.append([e["label"], f"{pm(av['average_accuracy_l2p'], n=n)} / {pm(av['forgetting_l2p'], n=n)}", pm(av["diagonal_min"], n=n),
                     pm(s["visual"]["average_accuracy_l2p"], n=n), paper_cell("table5", key)])
    val = {e["label"]: pm(e["summary"]["val"]["audio_visual"]["average_accuracy_l2p"], n=nseeds(e)) for e in d["rows"].values()}
    rows = [r[:2] + [val[r[0]]] + r[2:] for r in rows]
    return "\n".join([exp_caption(ctx, DEPTH, "test split (val beside it: settings are chosen on val)",
                                  "paper column: its Table 5 on VGGSound-100 (its Hard-Softmax row is at depth 3), not measured here"), "",
                      table(["row", "AV Average Acc / Forgetting (L2P), test", "AV Average Acc, val", "just learned, worst task (AV)",
                             "visual Average Acc", "paper (AV)"], rows)])


BUFFER = f"{RESULTS}/experiment_buffer_avdigits.json"


def gen_buffer(ctx: Ctx) -> str:
    d = load(BUFFER)
    rows = []
    for e in d["rows"].values():
        s, n = e["summary"]["test"], nseeds(e)
        rows.append([e["label"], pm(s["audio_visual"]["average_accuracy_l2p"], n=n), pm(s["audio_visual"]["forgetting_l2p"], n=n),
                     pm(s["audio"]["average_accuracy_l2p"], n=n), pm(s["visual"]["average_accuracy_l2p"], n=n)])
    return "\n".join([exp_caption(ctx, BUFFER, "test", "Average Acc / Forgetting with L2P's definitions"), "",
                      table(["exemplars per class", "AV Average Acc", "AV Forgetting", "audio Average Acc", "visual Average Acc"], rows)])


TASKS = f"{RESULTS}/experiment_tasks_avdigits.json"
TASKS16 = f"{RESULTS}/audio_16k/experiment_tasks_avdigits.json"


def gen_tasks(ctx: Ctx) -> str:
    out = []
    for rel in (TASKS, TASKS16):
        d = load(rel)
        rows = []
        for e in d["rows"].values():
            s, n = e["summary"]["test"], nseeds(e)
            per_seed = " / ".join(f(r["metrics"]["test"]["average_accuracy_l2p"]["visual"]) for r in e["runs"])
            tasks = e["settings"].get("tasks") or d["preset_settings"].get("tasks")
            rows.append([e["label"], f"{pm(s['audio_visual']['average_accuracy_l2p'], n=n)} / {pm(s['audio_visual']['forgetting_l2p'], n=n)}",
                         pm(s["audio_visual"]["final_accuracy"], n=n), per_seed,
                         paper_cell("tasks", str(tasks)) if e["method"] == "cign" and str(tasks) in load(PAPER)["tasks"] else "–"])
        out += [exp_caption(ctx, rel, "test", "paper column: CIGN on VGGSound-100 (4 and 10 tasks), not measured here"), "",
                table(["row", "AV Average Acc / Forgetting (L2P)", "AV final accuracy", "visual Average Acc per seed", "paper (AV)"], rows), ""]
    return "\n".join(out).rstrip()


READINGS = f"{RESULTS}/experiment_readings_avdigits.json"
SCALES = f"{RESULTS}/experiment_scales_avdigits.json"
SCARCE = f"{RESULTS}/experiment_scarce_avdigits.json"
COMPARE = {"avdigits": f"{RESULTS}/experiment_compare_avdigits.json", "fsdd_digits": f"{RESULTS}/experiment_compare_fsdd_digits.json"}


def per_seed(e: dict, split: str, key: str = "average_accuracy_l2p", m: str = "audio_visual") -> dict[int, float]:
    return {r["seed"]: r["metrics"][split][key][m] for r in e["runs"]}


def paired(e: dict, ref: dict, split: str, m: str = "audio_visual") -> str:
    """Row minus ref in modality m's Average Acc, per seed both finished, as mean ± std (paired by seed)."""
    a, b = per_seed(e, split, m=m), per_seed(ref, split, m=m)
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    return f"{pm(mean_std(diffs), n=len(diffs))}" if diffs else "–"


def gen_variants(ctx: Ctx, rel: str, ref: str = "cign") -> str:
    """Each row of an experiment against its reference row: audio-visual Average Acc on val (where settings
    are chosen) and test, the paired per-seed difference from the reference, forgetting and each modality."""
    rel = COMPARE[rel] if rel in COMPARE else rel
    d = load(rel)
    base = d["rows"][ref]
    rows = []
    for key, e in d["rows"].items():
        s, v, n = e["summary"]["test"], e["summary"]["val"], nseeds(e)
        diff = lambda split: "–" if key == ref else paired(e, base, split)  # noqa: E731
        rows.append([e["label"], pm(v["audio_visual"]["average_accuracy_l2p"], n=n), diff("val"),
                     f"{pm(s['audio_visual']['average_accuracy_l2p'], n=n)} / {pm(s['audio_visual']['forgetting_l2p'], n=n)}",
                     diff("test"), pm(s["audio"]["average_accuracy_l2p"], n=n), pm(s["visual"]["average_accuracy_l2p"], n=n), n])
    return "\n".join([exp_caption(ctx, rel, "val (chosen on) and test (reported)",
                                  f"differences are paired by seed against the row \"{base['label']}\""), "",
                      table(["row", "AV Average Acc, val", f"minus {ref}, val", "AV Average Acc / Forgetting, test",
                             f"minus {ref}, test", "audio Average Acc, test", "visual Average Acc, test", "seeds"], rows)])


def gen_scarce(ctx: Ctx) -> str:
    """Replay alone, CIGN and the best baseline per condition, with CIGN's and the baseline's paired gain over replay."""
    d = load(SCARCE)
    conds: dict[str, dict] = {}
    for key, e in d["rows"].items():
        method, cond = key.rsplit("-", 1)
        conds.setdefault(cond, {"label": e["label"].rsplit(", ", 1)[1]})[method] = e
    rows = []
    for c in conds.values():
        cell = lambda m, split="test": (pm(c[m]["summary"][split]["audio_visual"]["average_accuracy_l2p"], n=nseeds(c[m]))  # noqa: E731
                                        if m in c else "–")
        gain = lambda m, split, mod="audio_visual": (paired(c[m], c["replay"], split, mod)  # noqa: E731
                                                    if m in c and "replay" in c else "–")
        rows.append([c["label"], cell("replay"), cell("cign"), cell("il2m"), gain("cign", "val"), gain("cign", "test"),
                     gain("cign", "test", "audio"), gain("cign", "test", "visual"), gain("il2m", "test"),
                     min(nseeds(c[m]) for m in ("replay", "cign", "il2m") if m in c)])
    return "\n".join([exp_caption(ctx, SCARCE, "test (val beside the gains)",
                                  "audio-visual Average Acc with L2P's definitions (audio and visual where named); gains over replay alone are paired by seed, the seeds column counts the condition's fewest"), "",
                      table(["condition", "replay only", "CIGN", "IL2M", "CIGN minus replay, val", "CIGN minus replay, test",
                             "the same, audio", "the same, visual", "IL2M minus replay, test", "seeds"], rows)])


TSNE = f"{RESULTS}/experiment_tsne_avdigits.json"


def gen_tsne(ctx: Ctx) -> str:
    d = load(TSNE)
    rows = [[name, f"{v['mean']:.2f} ± {v['std']:.2f}", " / ".join(f"{x:.2f}" for x in v["per_seed"].values())]
            for name, v in d["silhouette"].items()]
    return "\n".join([ctx.source(TSNE, "silhouette by class (cosine, before t-SNE) of the encoder features of the first task's "
                                 "test clips after the last task", f"test split, {seeds_text(d['seeds'])} (the figure shows seed 0)",
                                 spec_text(d), cpu_label(d["machine"])), "",
                      table(["method", "silhouette, mean ± std", "per seed"], rows)])


def gen_default_run(ctx: Ctx) -> str:
    rows = []
    for rel in DEFAULT_RUNS:
        d = load(rel)
        for kind, r in d["kinds"].items():
            rows.append([short_cpu(d["machine"]), default_kind(kind, r), f"{r['seconds']:.0f}",
                         f(r["average_accuracy"]["audio_visual"]), f(r["final_accuracy"]["audio_visual"]),
                         f(r["average_accuracy"]["visual"]), " / ".join(f(x) for x in r["diagonal"]["audio_visual"])])
    return "\n".join([ctx.source(list(DEFAULT_RUNS), "the default `cign-train` (avdigits, `cpu` preset), seed 0, one run per row",
                                 "accuracy on the test split, %", *(cpu_label(load(r)["machine"]) for r in DEFAULT_RUNS)), "",
                      table(["CPU", "kind", "seconds", "AV average (AV-CIL)", "AV final", "visual average", "AV just learned, per task"],
                            rows, ["---", "---"] + ["---:"] * 5)])


TRAIN_CPU = (f"{RESULTS}/train_cpu.json", f"{RESULTS}/train_cpu_avx512.json", f"{RESULTS}/train_cpu_guard.json")


def gen_train_cpu(ctx: Ctx) -> str:
    files = [load(r) for r in TRAIN_CPU]
    keys = [(r["preset"], r["inputs"], r["batch"], r["precision"]) for r in files[0]["rows"]]
    rows = []
    for k in keys:
        cells = []
        for d in files:
            v = next((r["samples_per_s"] for r in d["rows"] if (r["preset"], r["inputs"], r["batch"], r["precision"]) == k), None)
            cells.append(f(v))
        rows.append([f"`{k[0]}` ({k[1]}), batch {k[2]}", k[3]] + cells)
    header = ["preset (inputs), batch", "precision"] + [f"{short_cpu(d['machine'])} ({ctx.link(r)})" for d, r in zip(files, TRAIN_CPU)]
    return "\n".join([ctx.source(list(TRAIN_CPU), "`python benchmarks/bench_train.py --device cpu`: samples/s of one CIGN training "
                                 "step (student + teacher + eqs 8-10 + Adam), 2 threads, channels_last, one run per file",
                                 *(cpu_label(d["machine"]) for d in files)), "",
                      table(header, rows, ["---", "---"] + ["---:"] * len(files))])


def gen_guard(ctx: Ctx) -> str:
    rel = TRAIN_CPU[2]
    d = load(rel)
    rows = [[f"`{r['preset']}` ({r['inputs']}), batch {r['batch']}", r["precision"], f(r["samples_per_s"]),
             f"{1000 * r['batch'] / r['samples_per_s']:.0f}", f(r["guard_ms"], 2), f"{100 * r['guard_share']:.2f} %"] for r in d["rows"]]
    return "\n".join([ctx.source(rel, "`python benchmarks/bench_train.py --device cpu`, one run", cpu_label(d["machine"])), "",
                      table(["preset (inputs), batch", "precision", "samples/s", "step, ms", "guard, ms", "guard's share of a step"],
                            rows, ["---", "---"] + ["---:"] * 4)])


def gen_guard_inline(ctx: Ctx) -> str:
    d = load(TRAIN_CPU[2])
    shares = [100 * r["guard_share"] for r in d["rows"]]
    return (f"{min(shares):.1f}-{max(shares):.1f} % of a training step at both presets, fp32 and bf16 "
            f"({short_cpu(d['machine'])}; {ctx.link(TRAIN_CPU[2])})")


TRAIN_GPU = (f"{RESULTS}/train_cuda.json", f"{RESULTS}/train_step_and_loader_cuda.json")


def gen_train_gpu(ctx: Ctx) -> str:
    a, b = (load(r) for r in TRAIN_GPU)
    rows = [[gpu_label(a), "`bench_train.py`", f"`{r['preset']}` ({r['inputs']}), batch {r['batch']}", r["precision"], f(r["samples_per_s"], 0)]
            for r in a["rows"]]
    rows += [[gpu_label(b), f"`cign-bench --train`, {r['what']}", f"`{r['preset']}`, batch {r['batch']}", r["precision"], f(r["samples_per_s"], 0)]
             for r in b["rows"]]
    return "\n".join([ctx.source(list(TRAIN_GPU), "samples/s, channels_last, one run each",
                                 f"{gpu_label(a)} (torch {a['machine'].get('torch_threads')} threads)",
                                 f"{gpu_label(b)}, {b['date']}, {b['steps']} steps, host {cpu_label(b['environment'])}, "
                                 f"torch {b['environment']['versions']['torch']}"), "",
                      table(["GPU", "tool, measure", "preset (inputs), batch", "precision", "samples/s"], rows,
                            ["---", "---", "---", "---", "---:"])])


DATA = (f"{RESULTS}/data.json", f"{RESULTS}/data_avx512.json")


def gen_data(ctx: Ctx) -> str:
    files = [load(r) for r in DATA]
    rows = []
    for i, r in enumerate(files[0]["rows"]):
        rows.append([r["measure"], r["unit"]] + [f(d["rows"][i]["value"], 0) for d in files])
    goal = files[0]["loader_goal_samples_per_s"]
    return "\n".join([ctx.source(list(DATA), f"`python benchmarks/bench_data.py`, {files[0]['store_samples']:,} store clips, "
                                 "one run per file; the loader goal is " + f"{goal:,} samples/s at the paper shapes",
                                 *(cpu_label(d["machine"]) for d in files)), "",
                      table(["measure", "unit"] + [f"{short_cpu(d['machine'])}" for d in files], rows, ["---", "---", "---:", "---:"])])


EXPORT = (f"{RESULTS}/export_cpu.json", f"{RESULTS}/export_paper.json")


def gen_export_latency(ctx: Ctx) -> str:
    rows = []
    for rel in EXPORT:
        d = load(rel)
        for r in d["rows"]:
            rows.append([f"`{d['preset']}` (K {d['classes']})", r["backend"], r["precision"], f(r["median_ms"]), f(r["p99_ms"]),
                         f"{r['vs_eager']:.2f}x", f(r.get("mb")) if "mb" in r else "–"])
    d = load(EXPORT[0])
    return "\n".join([ctx.source(list(EXPORT), "`python benchmarks/bench_export.py`: random weights, batch 1, onnxruntime CPU provider, "
                                 f"torch {d['torch_threads']} threads, one run per file", cpu_label(d["machine"])), "",
                      table(["preset", "backend", "precision", "median ms", "p99 ms", "vs eager fp32", "file MB"], rows,
                            ["---", "---", "---"] + ["---:"] * 4)])


def gen_normalization(ctx: Ctx) -> str:
    d = load(EXPORT[1])
    n = d["normalization"]
    return (f"numpy normalisation {n['numpy_ms']:.2f} ms per clip against {n['in_graph_ms']:.2f} ms for the same ops in onnxruntime "
            f"plus {n['feed_layout_ms']:.2f} ms for the layout change the graph still needs (`paper` shapes, batch 1; "
            f"{short_cpu(d['machine'])}; {ctx.link(EXPORT[1])})")


EXPORT_ACC = f"{RESULTS}/export_accuracy.json"
PRECISIONS = (("fp32", "fp32"), ("fp16", "fp16"), ("int8-trt", "INT8, trt recipe"), ("int8-cpu", "INT8, cpu recipe"))


def gen_export_accuracy(ctx: Ctx) -> str:
    d = load(EXPORT_ACC)
    runs = d["runs"]
    rows = []
    for p, name in PRECISIONS:
        cells = [" / ".join(f(r["accuracy"]["test"][p][m]) for r in runs) for m in MODALITIES]
        if p == "fp32":
            drop = agree = "–"
        else:
            drops = [r["accuracy"]["drop_vs_fp32"][p]["audio_visual"] for r in runs]
            goal = runs[0]["accuracy"]["goals"][p]["goal_max_drop"]
            drop = f"{pm(mean_std(drops), 2)}, at most {max(drops):.2f} (goal <= {goal:g})"
            agree = " / ".join(f"{100 * r['parity'][f'{p}_vs_fp32']['p_av']['top1_agreement']:.2f} %" for r in runs)
        rows.append([name] + cells + [drop, agree])
    conf = [[f"{r['confidence']['temperature']:.2f}", f"{r['confidence']['threshold']:.2f}", f"{r['confidence']['test']['ece']:.3f}",
             f"{100 * r['confidence']['test']['coverage']:.1f} %", f"{100 * r['confidence']['test']['answered_accuracy']:.1f} %",
             f"{100 * r['confidence']['test']['accuracy']:.1f} %"] for r in runs]
    seeds = [re.search(r"seed(\d+)", r["run"]).group(1) for r in runs]
    eager = max(r["parity"]["fp32_vs_eager"][o]["max_abs_diff"] for r in runs for o in ("p_audio", "p_visual", "p_av"))
    return "\n".join([
        ctx.source(EXPORT_ACC, f"task {runs[0]['task']} of the CIGN runs " + ", ".join(f"`{r['run']}`" for r in runs),
                   f"test split ({runs[0]['test_clips']} clips), top-1 %, per seed {' / '.join(seeds)}",
                   f"fp32 onnxruntime against eager: max |difference| {eager:.1e}", cpu_label(d["machine"])), "",
        table(["precision", "audio", "visual", "audio-visual", "AV drop vs fp32, mean ± std", "top-1 agreement with fp32 (p_av)"], rows,
              ["---"] + ["---:"] * 5), "",
        "Confidence calibration of the same exports (fitted on the val split, scored on test), per seed:", "",
        table(["seed", "temperature", "threshold", "ECE", "answered", "accuracy of the answered", "accuracy of all"],
              [[s] + c for s, c in zip(seeds, conf)]),
    ])


LATENCY = (("latency_paper.json", "latency_cpu.json", "latency_avdigits.json"),
           ("latency_paper_avx2.json", "latency_cpu_avx2.json", "latency_avdigits_avx2.json"),
           ("latency_paper_avx512.json", "latency_cpu_avx512.json", "latency_avdigits_avx512.json"),
           ("latency_paper_16threads.json",))


def model_name(d: dict) -> str:
    return f"`{d['preset']}` preset, random weights, K {d['classes']}" if d.get("preset") else f"trained avdigits export, K {d['classes']}"


def gen_latency(ctx: Ctx) -> str:
    out = []
    for group in LATENCY:
        rels = [f"{RESULTS}/{g}" for g in group]
        files = [load(r) for r in rels]
        rows = []
        for d in files:
            e, o32, o8 = lat_row(d, "fp32", backend="torch-cpu"), lat_row(d, "fp32"), lat_row(d, "int8-cpu")
            acc = d.get("accuracy_here") or d.get("accuracy") or {}
            drop = (f"{acc['int8-cpu']['drop']:+.2f} ({acc['fp32']['audio_visual']:.2f} -> {acc['int8-cpu']['audio_visual']:.2f} %)"
                    if "int8-cpu" in acc else "–")
            rows.append([model_name(d), f(d["flops"]["1"] / 1e9, 2), f(e["median_ms"]), f(o32["median_ms"]),
                         f"{o32['median_ms'] / e['median_ms']:.2f}x", f"{o32['vs_floor']:.2f}x", f(o8["median_ms"]),
                         f"{o8['median_ms'] / e['median_ms']:.2f}x", f"{o8['median_ms'] / o32['median_ms']:.2f}x", f(o8["p99_ms"]), drop])
        env = files[0]["environment"]
        peaks = files[0]["gemm_peak_gflops"]
        out += [ctx.source(rels, f"`cign-bench`, batch 1, medians, {env['threads']} threads, "
                           f"{files[0]['iterations']} timed calls (paper preset; cpu preset and export: "
                           f"{files[-1]['iterations']})", f"peaks measured in the same run: fp32 {peaks['fp32']:,.0f} GFLOP/s, "
                           f"int8 {peaks['int8']:,.0f} GOP/s", "the trained export's INT8 drop on the test split, re-scored on this instruction set",
                           f"onnxruntime {env['versions']['onnxruntime']}, torch {env['versions']['torch']}",
                           cpu_label(env)), "",
                table(["model", "GFLOP", "eager ms", "ort fp32 ms", "fp32 / eager", "fp32 / floor", "ort int8 ms", "int8 / eager",
                       "int8 / fp32", "int8 p99 ms", "int8 AV drop, points"], rows, ["---"] + ["---:"] * 10), ""]
    return "\n".join(out).rstrip()


def gen_latency_profile(ctx: Ctx) -> str:
    rows, rels = [], []
    for group in LATENCY[:3]:
        for g in group:
            rel = f"{RESULTS}/{g}"
            d = load(rel)
            for prec in ("fp32", "int8-cpu"):
                r = lat_row(d, prec)
                p = r.get("profile")
                if not p or (d.get("preset") == "cpu"):
                    continue
                parts = p["by_part"]
                at_peak = parts["conv"]["floor_ms"] + parts["matmul"]["floor_ms"]
                rows.append([short_cpu(d["environment"]), model_name(d), prec, f(p["kernel_ms"]),
                             f"{f(parts['conv']['ms'])} ({100 * parts['conv']['of_peak']:.0f} %)",
                             f"{f(parts['matmul']['ms'])} ({100 * parts['matmul']['of_peak']:.0f} %)",
                             f"{f(parts['other']['ms'])} ({100 * parts['other']['share']:.0f} %)", f(at_peak)])
                rels.append(rel)
    rels = list(dict.fromkeys(rels))
    return "\n".join([ctx.source(rels, "`cign-bench --profile 20`: onnxruntime's profiler, kernel time per batch-1 call; "
                                 "\"of peak\" = the kernels' FLOPs at the peak of their arithmetic / their time"), "",
                      table(["CPU", "model", "graph", "kernels ms", "convolutions ms (of peak)", "matrix products ms (of peak)",
                             "every other op ms (share)", "conv + matmul at peak, ms"], rows, ["---", "---", "---"] + ["---:"] * 5)])


def gen_avx2_peaks(ctx: Ctx) -> str:
    rel = f"{RESULTS}/latency_paper_avx2.json"
    peaks = load(rel)["gemm_peak_gflops"]
    return (f"{peaks['int8'] / peaks['fp32']:.1f}x the fp32 peak ({peaks['int8']:,.0f} against {peaks['fp32']:,.0f} GOP/s, "
            f"{short_cpu(load(rel)['environment'])}; {ctx.link(rel)})")


LIVE = f"{RESULTS}/live_pipeline.json"
SOAK = f"{RESULTS}/live_soak.json"


def gen_live(ctx: Ctx) -> str:
    d = load(LIVE)
    s = d["summary"]
    rows = [[stage] + [f(v[k], 2) for k in ("p50", "p90", "p99", "max", "mean")] for stage, v in s["stages"].items()]
    c = s["counts"]
    return "\n".join([
        ctx.source(LIVE, f"`python benchmarks/bench_live.py`: one {d['seconds']:.0f} s run, {d['model']}", "UDP camera stream + "
                   f"PulseAudio microphone at 48 kHz, one prediction every {d['hop_s']} s", cpu_label(d["machine"])), "",
        table(["stage", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"], rows), "",
        f"{s['predictions']} predictions in {s['wall_s']:.2f} s ({s['predictions_per_s']:.2f}/s); {c['overflow']} audio overflows, "
        f"{c['dropped_frame']:,} camera frames replaced unread, {c['stale_frame']} stale frames, {c['camera_gap']} camera gaps, "
        f"{c['audio_only']} audio-only predictions.",
    ])


def gen_live_goals(ctx: Ctx) -> str:
    d = load(LIVE)
    pre = d["preprocessing"]["paper"]
    paced = d["model_only_paced"]
    e2e = d["summary"]["stages"]["end_to_end"]
    measured = {
        "preprocess p99 at paper <= 3 ms": f"p50 {pre['live_ms']['p50']:.2f} / p99 {pre['live_ms']['p99']:.2f} ms as `Live` runs it "
                                           f"(resize overlapped); serial {pre['serial_ms']['p50']:.2f} / {pre['serial_ms']['p99']:.2f} ms",
        "end-to-end p99 <= paced model-only p99 + 10 ms": f"{e2e['p99']:.2f} ms against the model alone called once per "
                                                          f"{d['hop_s']} s, p99 {paced['p99']:.2f} ms",
        "zero audio overflows at 48 kHz": f"{d['overflows']} overflows, {d['underflows']} underflows in {d['callbacks']:,} callbacks",
        "audio callback max <= 1 ms": f"p99 {d['callback_p99_ms']:.3f} ms, max {d['callback_max_ms']:.3f} ms, {d['slow_callbacks']} over 1 ms",
    }
    rows = [[goal, measured.get(goal, "see the JSON"), "met" if ok else "**not met**"] for goal, ok in d["goals"].items()]
    return "\n".join([ctx.source(LIVE, "the same run", f"model alone back to back: p50 {d['model_only_before']['p50']:.2f} ms; "
                                 f"paced at the live cadence: p50 {paced['p50']:.2f} ms", cpu_label(d["machine"])), "",
                      table(["goal", "measured", ""], rows, ["---", "---", "---"])])


def gen_soak(ctx: Ctx) -> str:
    d = load(SOAK)
    w = [x["latency_ms"]["p99"] for x in d["windows"]]
    rows = [[goal, "met" if ok else "**not met**"] for goal, ok in d["goals"].items()]
    return "\n".join([
        ctx.source(SOAK, f"`python benchmarks/bench_live.py --soak {d['seconds']:.0f}`, {d['summary']['predictions']:,} predictions, the "
                   "same setup", cpu_label(d["machine"])), "",
        f"Resident memory rose {d['rss_warmup_mb']:.1f} MB in the first {d['rss_growth_from_s']:.0f} s and then "
        f"{d['rss_growth_mb']:.2f} MB to the end; end-to-end p99 per {d['windows'][0]['t_s']:.0f} s window stayed within "
        f"{min(w):.1f}-{max(w):.1f} ms (last window's minus first's {d['e2e_p99_drift_ms']:+.1f} ms); {d['overflows']} overflows and "
        f"{d['underflows']} underflows in {d['callbacks']:,} audio callbacks, {d['video_reconnects']} camera reconnects; callback p99 "
        f"{d['callback_p99_ms']:.3f} ms, {d['slow_callbacks']} callbacks over 1 ms (max {d['callback_max_ms']:.2f} ms).", "",
        table(["goal", ""], rows, ["---", "---"]),
    ])


# ------------------------------------------------------------------------------------- other pages

FIRST = f"{STUDIES}/first_step_avdigits.json"


def gen_first_step(ctx: Ctx, what: str) -> str:
    d = load(FIRST)
    b, r = d["teacher_bn"]["batch"], d["teacher_bn"]["running"]
    where = f"({seeds_text(d['seeds'])}, {short_cpu(d['machine'])}; {ctx.link(FIRST)})"
    if what == "kl":
        return (f"the table KL is {pm(b['kl_table'], 4)} and the contextual KL {pm(b['kl_contextual'], 3)} at task 2's first step "
                + where)
    if what == "ppos":
        return (f"at task 2's first step p_pos is {b['label_p_pos_a'][0]:.2f} audio / {b['label_p_pos_v'][0]:.2f} visual with `label`, "
                f"{b['maxpool_p_pos_a'][0]:.2f} / {b['maxpool_p_pos_v'][0]:.2f} with `maxpool` " + where)
    if what == "maxpool":
        return (f"at task 2's first step the max lands on the anchor's own slot for {100 * b['maxpool_own_slot_a'][0]:.0f} % of "
                f"anchor-negative pairs on the audio side and {100 * b['maxpool_own_slot_v'][0]:.0f} % on the visual side, and the "
                f"positive's share p_pos is {b['maxpool_p_pos_v'][0]:.2f} on the visual side while student and teacher agree "
                f"to a cosine of {b['maxpool_cos_pos_v'][0]:.4f} " + where)
    if what == "bn":
        return (f"anchor-positive cosine of g on old samples at task 2's first step: {b['maxpool_cos_pos_a'][0]:.3f} audio / "
                f"{b['maxpool_cos_pos_v'][0]:.4f} visual with `batch`, {r['maxpool_cos_pos_a'][0]:.3f} / {r['maxpool_cos_pos_v'][0]:.3f} "
                "with `running` " + where)
    raise ValueError(what)


HARD_AUDIO = f"{STUDIES}/hard_audio_avdigits.json"


def hard_audio_rows() -> tuple[dict, dict, dict]:
    """The study's JSON and its soft (default run) and hard rows' mean ± std."""
    d = load(HARD_AUDIO)
    return d, d["rows"]["depth1"]["mean_std"], d["rows"]["hard"]["mean_std"]


def hard_audio_text(ctx: Ctx) -> str:
    """What hard assignment does to the audio branch (P = 1), from the trained Table 5 models (task 5, ten classes)."""
    d, soft, hard = hard_audio_rows()
    k = next(iter(d["rows"]["hard"]["per_seed"].values()))["classes"]
    return (f"with soft assignment every one of the {k} audio class slots receives nearly the same audio feature (the "
            f"largest slot holds {pm(soft['spread'])} % of the slots' summed norm of g_a,i - c_hat_a,i; even is "
            f"{100 / k:.0f} %), which adds nearly one constant to every audio logit, so the ranking comes from phi_a's "
            f"tokens: their logits alone name the class in {pm(soft['tokens_only'])} % of clips, the audio head in "
            f"{pm(soft['audio'])} %. Hard assignment puts the feature on one slot ({pm(hard['spread'])} %) and leaves "
            f"every other slot at its token, but that slot is the audio prediction in only {pm(hard['slot_is_prediction'])} % "
            f"of clips and the right class in {pm(hard['slot'])} % (chance {100 / k:.0f} %): the audio head still ranks by "
            f"the tokens and reaches {pm(hard['audio'])} % (soft {pm(soft['audio'])} %). The loss is the visual head's, "
            f"{pm(hard['visual'])} % against {pm(soft['visual'])} %, and audio-visual {pm(hard['audio_visual'])} % against "
            f"{pm(soft['audio_visual'])} %, the last task's model over all classes {where(d['split'], d['seeds'], d['machine'])}; "
            f"{ctx.link(HARD_AUDIO)}")


def hard_audio_answer() -> str:
    d, soft, hard = hard_audio_rows()
    return (f"It puts the audio feature on one class slot, but that slot is the right class in {pm(hard['slot'])} % of clips, "
            f"about chance, and the audio head ranks by phi_a's tokens under both assignments ({pm(hard['audio'])} % hard, "
            f"{pm(soft['audio'])} % soft); Table 5's Hard-Softmax loss is the visual head's ({pm(hard['visual'])} % against "
            f"{pm(soft['visual'])} %) {where(d['split'], d['seeds'], d['machine'])}.")


ONEDNN = f"{STUDIES}/onednn_bf16_conv_grad.json"
PROFILE = f"{STUDIES}/train_step_profile.json"


def gen_onednn(ctx: Ctx) -> str:
    d = load(ONEDNN)
    rows = []
    for e in d["entries"]:
        impl = sorted({r["implementation"] for r in e["rows"] if r["implementation"]}) or ["not recorded"]
        tested = sorted({r["batch"] for r in e["rows"]})
        rows.append([e["label"], f"torch {e['torch']}, oneDNN {e['onednn']}", ", ".join(impl), ", ".join(map(str, tested)),
                     ", ".join(f"{r['batch']}: {r['bf16']} of {r['calls']}" for r in e["rows"] if r["bf16"]) or "none",
                     str(sum(r["fp32"] + r["bf16_without_onednn"] for r in e["rows"])), "this script" if e["source"] == "this script" else "reported"])
    return "\n".join([ctx.source(ONEDNN, "`python benchmarks/studies/onednn_bf16_conv_grad.py`, one entry per CPU"), "",
                      table(["CPU", "versions", "oneDNN implementation", "batches probed", "bf16 calls with a non-finite weight gradient, "
                             "per batch", "non-finite in fp32 or without oneDNN", "source"], rows, ["---"] * 7)])


# --------------------------------------------------------------------------------------- studies

def rel_study(name: str) -> str:
    return f"{STUDIES}/{name}"


PROBE_FILES = ("audio_probe_avdigits.json", "audio_probe_band_avdigits.json", "audio_probe_16k_avdigits.json",
               "audio_probe_mix_stem_avdigits.json")


def gen_audio_probe(ctx: Ctx) -> str:
    out = []
    for file in PROBE_FILES:
        d = load(rel_study(file))
        rows = [[f"`{k}`", f"{pm([r['mean'], r['std']])}", " / ".join(f(x) for x in r["val_accuracy"]),
                 (f"{r['spec']['sample_rate'] / 1000:g} kHz, {r['spec']['n_mels']} bands" if "spec" in r else "8 kHz (the file predates the spec field)"),
                 f"{r['train_per_class']} x {r['epochs']}"] for k, r in d["rows"].items()]
        out += [ctx.source(rel_study(file), f"{d['split']} split, {seeds_text(d['seeds'])}", "probe accuracy, %", cpu_label(d["machine"])), "",
                table(["variant", "mean ± std", "per seed", "audio", "clips per class x epochs"], rows, ["---", "---:", "---:", "---", "---:"]), ""]
    return "\n".join(out).rstrip()


def band_rows(rel: str, split: str) -> dict:
    d = load(rel)
    return {k: e["summary"][split] for k, e in d["rows"].items()}


BAND8 = rel_study("audio_8k/experiment_methods_avdigits.json")


def gen_band(ctx: Ctx) -> str:
    rows = []
    for split in ("test", "val"):
        a, b = band_rows(BAND8, split), band_rows(CURRENT, split)
        for label, key, m, col in (("joint: audio final", "joint", "audio", "final_accuracy"),
                                   ("joint: audio-visual final", "joint", "audio_visual", "final_accuracy"),
                                   ("CIGN: audio-visual average (AV-CIL)", "cign", "audio_visual", "average_accuracy"),
                                   ("CIGN: audio-visual final", "cign", "audio_visual", "final_accuracy"),
                                   ("CIGN: audio final", "cign", "audio", "final_accuracy"),
                                   ("CIGN: visual average (AV-CIL)", "cign", "visual", "average_accuracy"),
                                   ("fine-tuning: audio-visual final", "finetune", "audio_visual", "final_accuracy")):
            rows.append([split, label, pm(a[key][m][col]), pm(b[key][m][col])])
    d8, d16 = load(BAND8), load(CURRENT)
    return "\n".join([ctx.source([BAND8, CURRENT], seeds_text(d8["seeds"]), "mean ± std, %", f"8 kHz: {cpu_label(d8['machine'])}",
                                 f"16 kHz: {cpu_label(d16['machine'])}"), "",
                      table(["split", "row", spec_text(d8), spec_text(d16)], rows, ["---", "---", "---:", "---:"])])


ENCODER_LR = rel_study("encoder_lr_avdigits.json")


def gen_encoder_lr(ctx: Ctx) -> str:
    d = load(ENCODER_LR)
    rows = []
    for s in d["sweeps"]:
        by = {(r["rate"], r["method"]): r for r in s["rows"]}
        for rate in dict.fromkeys(r["rate"] for r in s["rows"]):
            j, c = by.get((rate, "joint")), by.get((rate, "cign"))
            ms = lambda r, k: "–" if r is None else f"{r[k]['mean']:.1f} ± {r[k]['std']:.1f}"  # noqa: E731
            per = ("–" if c is None else " / ".join(f(min(run["diagonal"]["audio_visual"])) for run in c["runs"].values()))
            rows.append([s["label"], "the preset's" if rate == "none" else rate, seeds_text((j or c)["seeds"]), ms(j, "final_audio"),
                         ms(j, "final_audio_visual"), ms(c, "average_audio_visual"), ms(c, "worst_just_learned_audio_visual"), per])
    return "\n".join([ctx.source(ENCODER_LR, "val split, mean ± std, %"), "",
                      table(["device", "audio encoder's lr", "seeds", "joint audio final", "joint AV final", "CIGN AV average",
                             "CIGN worst just-learned AV", "per seed"], rows, ["---", "---", "---"] + ["---:"] * 5)])


def gen_first_step_table(ctx: Ctx) -> str:
    d = load(FIRST)
    keys = [("kl_table", "eq 8 KL, token table"), ("kl_contextual", "eq 8 KL, contextual tokens"),
            ("label_p_pos_a", "eq 9 p_pos audio, `label` negatives"), ("label_p_pos_v", "eq 9 p_pos visual, `label`"),
            ("maxpool_p_pos_a", "eq 9 p_pos audio, `maxpool` negatives"), ("maxpool_p_pos_v", "eq 9 p_pos visual, `maxpool`"),
            ("maxpool_cos_pos_a", "anchor-positive cosine audio"), ("maxpool_cos_pos_v", "anchor-positive cosine visual"),
            ("label_cos_neg_a", "anchor-negative cosine audio, `label`"), ("maxpool_cos_neg_a", "anchor-negative cosine audio, `maxpool`"),
            ("c_hat_cos_a", "old contextual tokens, student vs teacher cosine, audio"), ("c_hat_cos_v", "the same, visual")]
    rows = [[name] + [pm(d["teacher_bn"][bn][k], 4) for bn in ("batch", "running")] for k, name in keys]
    return "\n".join([ctx.source(FIRST, f"{d['split']} batches ({d['batches']} per seed), {seeds_text(d['seeds'])}",
                                 cpu_label(d["machine"])), "",
                      table(["at task 2's first step", "teacher BN `batch`", "teacher BN `running`"], rows)])


HEAD = rel_study("head_probe_avdigits.json")


def gen_head_probe(ctx: Ctx) -> str:
    d = load(HEAD)
    rows = []
    for method, per_seed in d["per_method_per_seed"].items():
        for m in ("audio", "visual"):
            head = mean_std(v[f"head_{m}"] for v in per_seed.values())
            probes = [mean_std(v[f"probe_{m}_C{c:g}"] for v in per_seed.values()) for c in d["C"]]
            rows.append([method, m, pm(head), " / ".join(pm(p) for p in probes),
                         " / ".join(f(v[f"head_{m}"]) for v in per_seed.values())])
    seeds = [int(s) for s in next(iter(d["per_method_per_seed"].values()))]
    return "\n".join([ctx.source(HEAD, f"last task's checkpoint of `{d['runs']}`, {d['split']} split, {seeds_text(seeds)}",
                                 cpu_label(d["machine"])), "",
                      table(["method", "modality", "head", "probe at C " + " / ".join(f"{c:g}" for c in d["C"]), "head per seed"], rows,
                            ["---", "---", "---:", "---:", "---:"])])


JOINT_EPOCHS = rel_study("joint_epochs_avdigits.json")


def gen_joint_epochs(ctx: Ctx) -> str:
    d = load(JOINT_EPOCHS)
    rows = []
    for r in d["rows"]:
        for split in ("val", "test"):
            cells = [pm(mean_std(run["metrics"][split]["final_accuracy"][m] for run in r["runs"])) for m in MODALITIES]
            rows.append([f"{r['epochs'][0]} / {r['epochs'][1]}", split] + cells)
    return "\n".join([ctx.source(JOINT_EPOCHS, f"`joint`, final accuracy on all classes, {seeds_text(d['seeds'])}, mean ± std, %",
                                 cpu_label(d["machine"])), "",
                      table(["epochs (first / later tasks)", "split", "audio", "visual", "audio-visual"], rows, ["---", "---", "---:", "---:", "---:"])])


PRETRAIN = (rel_study("pretrain_avdigits.json"), rel_study("pretrain_simclr_ezvsl_avdigits.json"))


def gen_pretrain(ctx: Ctx) -> str:
    out = []
    for rel in PRETRAIN:
        d = load(rel)
        rows = []
        for p in d["pretraining"]:
            h = p["history"]
            rows.append([f"`{p['name']}`: {p['objective']}" + (f", {p['prototypes']} prototypes" if p.get("prototypes") else "")
                         + (f" + {p['cross']:g} x infonce" if p.get("cross") else ""), f"{p['tau']:g}", f"{p['lr']:g}", str(p["batch_size"]),
                         str(h["epoch"][-1]), f"{h['train_loss'][0]:.2f} -> {h['train_loss'][-1]:.2f}", f"{h['val_loss'][-1]:.2f}",
                         f"{100 * h['val_class_retrieval'][-1]:.1f} % (chance {100 * h['val_class_chance'][-1]:.1f} %)",
                         f"{h['val_nmi_audio'][0]:.2f} -> {h['val_nmi_audio'][-1]:.2f} / {h['val_nmi_visual'][0]:.2f} -> {h['val_nmi_visual'][-1]:.2f}"])
        runs = [[c["tag"] + (f" (from `{d['best']}`)" if c["args"] and "--encoder-weights" in c["args"] else ""), str(c["seed"]),
                 f(c["average_accuracy"]["audio_visual"]), f(c["average_accuracy"]["visual"]), f(c["final_accuracy"]["audio"]),
                 f(c["final_accuracy"]["visual"])] for c in d["cign_runs"]]
        where = d["device"] if "host" not in d or "cpu" not in d["host"] or "flags" not in d["host"] else cpu_label(d["host"])
        out += [ctx.source(rel, f"{d['split']} split", where + (f", {d['date']}" if d.get("date") else ""),
                           f"{d['jobs_at_a_time']} run(s) at a time"), "",
                table(["objective", "tau", "lr", "batch", "epochs", "train objective", "val objective", "val class retrieval",
                       "val k-means NMI audio / visual (epoch 1 -> last)"], rows, ["---"] + ["---:"] * 8), "",
                table(["run", "seed", "AV average", "visual average", "audio final", "visual final"], runs, ["---"] + ["---:"] * 5), ""]
    return "\n".join(out).rstrip()


TASK_PROBE = rel_study("task_probe_avdigits.json")


def gen_task_probe(ctx: Ctx) -> str:
    d = load(TASK_PROBE)
    rows = []
    for label, per_seed in d["per_seed_per_task"].items():
        for seed, tasks in per_seed.items():
            for m in ("audio", "visual"):
                rows.append([label, seed, m, " / ".join(f"{t[f'logit_spread_{m}']:.2f}" for t in tasks),
                             " / ".join(f(t[f"ncm_{m}"], 0) for t in tasks)])
    return "\n".join([ctx.source(TASK_PROBE, f"{d['split']} clips of all ten classes after each task", cpu_label(d["machine"])), "",
                      table(["run", "seed", "modality", "logit spread after each task", "nearest-class-mean probe after each task, %"], rows,
                            ["---", "---", "---", "---", "---"])])


READOUT = rel_study("visual_readout_avdigits.json")
READOUT_NAMES = {"mean": "mean over locations -> linear", "max": "max over locations -> linear",
                 "mil": "linear at every location, best location", "nce_mil": "InfoNCE vs a perfect audio side, best location",
                 "nce_max": "InfoNCE vs a perfect audio side, max over locations",
                 "cign_grouping": "CIGN's grouping (`cign-train --method joint --tasks 1`)"}


def readout_final(d: dict, kind: str) -> list[float]:
    return [v[-1] for v in d["val_accuracy_per_epoch"][kind].values()]


def gen_visual_readout(ctx: Ctx) -> str:
    d = load(READOUT)
    rows = []
    for kind, per_seed in d["val_accuracy_per_epoch"].items():
        final = readout_final(d, kind)
        rows.append([READOUT_NAMES.get(kind, kind), " / ".join(f(x) for x in final), pm(mean_std(final))])
    seeds = list(next(iter(d["val_accuracy_per_epoch"].values())))
    return "\n".join([ctx.source(READOUT, f"{d['split']} split, after {d['epochs']} epochs, {seeds_text(int(s) for s in seeds)}",
                                 f"InfoNCE tau {d['tau']:g}", cpu_label(d["machine"])), "",
                      table(["read-out of the frame", "per seed", "mean ± std"], rows, ["---", "---:", "---:"])])


STRIDE = rel_study("visual_stride.json")


def gen_visual_stride(ctx: Ctx) -> str:
    d = load(STRIDE)
    rows = []
    for stride, r in d["strides"].items():
        st = r["step"]
        rows.append([stride, f(st["gflop"]), f(st["native_ms"], 0), f(st.get("avx2_ms"), 0),
                     *(pm(r["summary"][k]) for k in ("average_audio_visual", "final_audio_visual", "final_visual",
                                                     "final_audio", "worst_just_learned_audio_visual")),
                     f(statistics.fmean(x["seconds"] for x in r["runs"]), 0)])
    return "\n".join([
        table(["visual stride", "GFLOP / step", "step, native, ms", "step, AVX2 fp32, ms", "AV average", "AV final",
               "visual final", "audio final", "worst just-learned AV", "run, native, s"], rows),
        "",
        ctx.source(STRIDE, f"`cpu` preset, a training step of a later task at batch {d['batch']} (student, teacher, eqs 8-10, "
                   "backward, Adam), the best of interleaved rounds; CIGN on avdigits' val split, "
                   f"{seeds_text(d['seeds'])}, mean ± std over seeds, %, native precision", cpu_label(d["machine"]), d["date"]),
    ])


def gen_avx2_demo(ctx: Ctx) -> str:
    """Inline: the demo's time on the AVX2 code path and why its training step cannot go faster."""
    demo, d = load(DEMO), load(STRIDE)
    kinds = demo["kinds"]
    one, two = d["strides"]["1"], d["strides"]["2"]
    rate = one["step"]["gflop"] / one["step"]["avx2_ms"] * 1000
    native = f" against {kinds['native']['pass1']['seconds']:.0f} s natively" if "native" in kinds else ""
    return (f"`make demo` takes {kinds['avx2']['pass1']['seconds']:.0f} s after set-up on the AVX2 code path "
            f"(training {kinds['avx2']['pass1']['stages']['train']['seconds']:.0f} s of it){native} "
            f"({short_cpu(demo['machine'])}; {ctx.link(DEMO)}). Its fp32 training step is compute-bound: "
            f"{f(one['step']['gflop'])} GFLOP in {f(one['step']['avx2_ms'], 0)} ms, {f(rate, 0)} GFLOP/s against the two "
            f"cores' AVX2 FMA peak of {f(d['avx2_peak_gflops'], 0)} GFLOP/s, so only fewer FLOPs or fewer steps shorten it. "
            f"`--visual-stride 2` halves the FLOPs ({f(two['step']['gflop'])} GFLOP, {f(two['step']['avx2_ms'], 0)} ms) but "
            f"CIGN's visual final accuracy falls from {pm(one['summary']['final_visual'])} % to "
            f"{pm(two['summary']['final_visual'])} % and the audio-visual one from "
            f"{pm(one['summary']['final_audio_visual'])} % to {pm(two['summary']['final_audio_visual'])} % "
            f"({d['split']} split, {seeds_text(d['seeds'])}; {ctx.link(STRIDE)})")


ENROLL, ENROLL_SWEEP = f"{RESULTS}/enroll.json", f"{RESULTS}/enroll_sweep.json"


def gen_enroll(ctx: Ctx) -> str:
    """cign-enroll against cign-train on the same shots, per N, mean ± std over seeds (test split)."""
    d = load(ENROLL)
    s = d["summary"]
    c = lambda x: pm([x["mean"], x["std"]], n=len(d["seeds"]))  # noqa: E731
    rows = [["before enrolment (8 classes)", "–", "–", c(s["before"]["fp32"]["old"]), "–"],
            ["cign-train, all clips", c(s["train_all"]["new"]), "–", c(s["train_all"]["old"]), c(s["train_all"]["false_accepts"])]]
    for n in map(str, d["shots"]):
        r = s[n]
        shots = f"{n} shot{'' if n == '1' else 's'}"
        for label, x in ((f"{shots}: cign-enroll, fp32", r["enroll"]["fp32"]),
                         (f"{shots}: cign-enroll, int8-cpu", r["enroll"]["int8-cpu"])):
            rows.append([label, c(x["new"]), c(x["new_answered"]), c(x["old"]), c(x["false_accepts"])])
        if "train_same_shots" in r:
            t = r["train_same_shots"]
            rows.append([f"{shots}: cign-train, same clips", c(t["new"]), "–", c(t["old"]), c(t["false_accepts"])])
    return "\n".join([
        table(["model", "new classes AV %", "new, answered %", "old classes AV %", "false accepts %"], rows,
              ["---"] + ["---:"] * 4),
        "",
        ctx.source(ENROLL, f"avdigits, `cpu` preset, {d['split']} split, {seeds_text(d['seeds'])}, mean ± std over seeds; "
                   "new classes: the two digits enrolled (or trained) after the first 8; answered: named right with the "
                   "export's confidence above its threshold; false accepts: old-class clips whose top-1 is a new class; "
                   f"the export's exemplar features take {statistics.fmean(x['exemplars_bytes'] for x in d['per_seed'].values()) / 1e6:.1f} MB",
                   cpu_label(d["machine"]), d["date"]),
    ])


def gen_enroll_seeds(ctx: Ctx) -> str:
    """Per N and seed: cign-enroll (fp32) against the model before it and cign-train on the same clips."""
    d = load(ENROLL)
    rows = []
    for n in map(str, d["shots"]):
        for seed, r in d["per_seed"].items():
            e, ref = r["shots"][n]["enroll"]["fp32"], r["shots"][n].get("train_same_shots")
            rows.append([n, seed, f(e["new"]), f(e["old"]), f(e["false_accepts"]), f(r["before"]["fp32"]["old"]),
                         f(ref["new"]) if ref else "–", f(ref["old"]) if ref else "–", f(r["train_all"]["new"])])
    return "\n".join([
        table(["shots", "seed", "enrolled: new %", "old %", "false accepts %", "old % before", "cign-train same shots: new %",
               "old %", "cign-train all clips: new %"], rows, ["---:"] * 9),
        "",
        ctx.source(ENROLL, f"avdigits, `cpu` preset, {d['split']} split, audio-visual accuracy, fp32 graph",
                   cpu_label(d["machine"]), d["date"]),
    ])


def gen_enroll_time(ctx: Ctx) -> str:
    """Inline: the time and peak memory of enrolling one class, per instruction set."""
    d = load(ENROLL)
    t = d["timing"]
    parts = [f"{kind}: {min(k['in_process_s']):.1f}-{max(k['in_process_s']):.1f} s (the fit "
             f"{min(k['fit_s']):.1f}-{max(k['fit_s']):.1f} s), peak RSS {max(k['peak_rss_mb']):.0f} MB"
             for kind, k in t["kinds"].items() if "skipped" not in k]
    return (f"enrolling one class from {t['shots']} shots, {len(next(iter(t['kinds'].values()))['wall_s'])} times each, "
            f"took {'; '.join(parts)} ({short_cpu(d['machine'])}, native and CPUID-masked to AVX2; {ctx.link(ENROLL)})")


def gen_enroll_swap(ctx: Ctx) -> str:
    """Inline: the prediction intervals of a running cign-live around a hot swap."""
    d = load(ENROLL)
    w = d["swap"]
    return (f"at a hop of {w['hop_s']:g} s the longest interval between two predictions around the swap was "
            f"{w['max_gap_around_swap_s']:.3f} s, and {w['max_gap_before_s']:.3f} s before it ({w['predictions']} "
            f"predictions, the swap at prediction {w['swap_index']}, onnxruntime session {w['session']}; "
            f"{short_cpu(d['machine'])}; {ctx.link(ENROLL)})")


def gen_enroll_sweep(ctx: Ctx) -> str:
    """The fit-option grid on val from which FitOptions' defaults were chosen."""
    d = load(ENROLL_SWEEP)
    keys = list(d["grid"])
    rows = [[*(str(r[k]) for k in keys), f(r["new"]), f(r["old"]), f(r["false_accepts"])] for r in d["rows"]]
    return "\n".join([
        table([*keys, "new AV %", "old AV %", "false accepts %"], rows, ["---"] * len(keys) + ["---:"] * 3),
        "",
        ctx.source(ENROLL_SWEEP, f"avdigits, `cpu` preset, {d['split']} split without the export's exemplar clips "
                   f"({d['clips']} clips), seed {d['seed']}, {d['shots']} shots per class", cpu_label(d["machine"]), d.get("date", "")),
    ])


def where(split: str, seeds, machine) -> str:
    """'(val split, seeds 1-5; AMD EPYC, 2 cores, AVX-512 BF16)' for a study's answer."""
    m = machine if isinstance(machine, str) else short_cpu(machine)
    return f"({split} split, {seeds_text(seeds)}; {m})"


def fp16_answer() -> str:
    """The float16 study's answer: the range of the mean |diff ln p_av| per graph, in float16 arithmetic."""
    d = load(rel_study("fp16_arithmetic.json"))
    rows = [r for e in d["exports"] for r in e["rows"]]

    def cell(graph: str, runner: str = "numpy, tensor types") -> str:
        rs = [r for r in rows if (r["graph"], r["runner"]) == (graph, runner)]
        dl = [r["mean_abs_dln_p_av"] for r in rs]
        return f"{min(dl):.3f}-{max(dl):.3f}"

    outputs_fp32 = "fp16 outputs' ops fp32"
    return (f"In float16 arithmetic (numpy, each tensor's type) the mean absolute difference of ln p_av from fp32 is "
            f"{cell('fp16 every layer')} with every layer float16, {cell(outputs_fp32)} with the output ops float32 and "
            f"{cell('fp16')} for the export's FP16 graph (normalisations and reductions float32 too); the INT8 graph for "
            f"TensorRT gives {cell('int8-trt fp32 layers')} with float32 layers and {cell('int8-trt')} with float16 ones. "
            f"onnxruntime's CPU provider hides float16 ({cell('fp16 every layer', 'onnxruntime cpu')} for the all-float16 graph) "
            f"and, with its default optimizations, mis-computes the float16 INT8 graph ({cell('int8-trt', 'onnxruntime cpu')}; "
            f"{cell('int8-trt', 'onnxruntime cpu, WeightBiasQuantization off')} with WeightBiasQuantization off). "
            f"{len(d['exports'])} trained avdigits models, test split; {short_cpu(d['machine'])}.")


def study_answers(ctx: Ctx) -> dict[str, str]:
    band_d = load(rel_study("audio_probe_band_avdigits.json"))
    band = band_d["rows"]
    higher = all(a > b for a, b in zip(band["16k"]["val_accuracy"], band["8k"]["val_accuracy"]))
    p16 = load(rel_study("audio_probe_16k_avdigits.json"))
    mix = load(rel_study("audio_probe_mix_stem_avdigits.json"))
    b8, b16 = band_rows(BAND8, "test"), band_rows(CURRENT, "test")
    sweeps = load(ENCODER_LR)["sweeps"]
    lr = next((s for s in sweeps if "NVIDIA" not in s["label"]), sweeps[0])
    lr_by = {(r["rate"], r["method"]): r for r in lr["rows"]}
    lr_ms = lambda rate, method, k: f"{lr_by[(rate, method)][k]['mean']:.1f} ± {lr_by[(rate, method)][k]['std']:.1f}"  # noqa: E731
    fsd = load(FIRST)
    fs = fsd["teacher_bn"]["batch"]
    hpd = load(HEAD)
    hp = hpd["per_method_per_seed"]
    hmean = lambda meth, k: statistics.fmean(v[k] for v in hp[meth].values())  # noqa: E731
    best_probe = lambda meth: max(hmean(meth, f"probe_audio_C{c:g}") for c in hpd["C"])  # noqa: E731
    jed = load(JOINT_EPOCHS)
    je_a = [mean_std(run["metrics"]["test"]["final_accuracy"]["audio"] for run in r["runs"]) for r in jed["rows"]]
    pt = load(PRETRAIN[0])
    nmi = [max(p["history"]["val_nmi_audio"][-1], p["history"]["val_nmi_visual"][-1]) for p in pt["pretraining"]]
    nmi0 = [x for p in pt["pretraining"] for x in (p["history"]["val_nmi_audio"][0], p["history"]["val_nmi_visual"][0])]
    scratch = [c for c in pt["cign_runs"] if c["tag"] == "cign"]
    ptd = [c for c in pt["cign_runs"] if c["tag"] == "cignpt"]
    tpd = load(TASK_PROBE)
    tp = tpd["per_seed_per_task"]
    first = lambda label: [t[0][f"logit_spread_{m}"] for t in tp[label].values() for m in ("audio", "visual")]  # noqa: E731
    one, two = first("10 tasks x 1 class"), first("5 tasks x 2 classes")
    vr = load(READOUT)
    vr_seeds = [int(s) for s in next(iter(vr["val_accuracy_per_epoch"].values()))]
    od = load(ONEDNN)["entries"]
    vsd = load(STRIDE)
    vs1, vs2 = vsd["strides"]["1"], vsd["strides"]["2"]
    prof = load(PROFILE)
    runs = {r["kind"]: r for r in prof["runs"]}
    conv = {k: sum(op["self_ms_per_step"] for op in r["top_ops"] if "convolution" in op["op"]) for k, r in runs.items()}
    mm = {k: sum(op["self_ms_per_step"] for op in r["top_ops"] if op["op"] in ("aten::mm", "aten::addmm"))
          for k, r in runs.items()}
    nan_cpus = list(dict.fromkeys(short_cpu(e["machine"]) for e in od if any(r["bf16"] for r in e["rows"])))
    clean_cpus = list(dict.fromkeys(short_cpu(e["machine"]) for e in od if not any(r["bf16"] for r in e["rows"])))
    v = lambda x: f"{x:.1f}"  # noqa: E731
    cell = lambda d, k: f"{pm([d['rows'][k]['mean'], d['rows'][k]['std']])} %"  # noqa: E731
    return {
        "bench_audio_probe.py": (
            f"The input band: 16 kHz audio reaches {cell(band_d, '16k')} against {cell(band_d, '8k')} at 8 kHz "
            f"{where('val', band_d['seeds'], band_d['machine'])}{', higher on every seed' if higher else ''}; it became the `cpu` "
            f"preset's spec. CIGN's BCE head ({cell(p16, '16k bce')}) and 16 epochs ({cell(p16, '16k x 16')}) help the probe; EMA, "
            "time stretching, cepstral normalisation, SpecAugment masks, mixup, mixing down a second clip and more clips at equal "
            f"steps do not; a 2 x 1 stem reaches {cell(mix, '16k bce adam stem 2x1')} against {cell(mix, '16k bce adam')} "
            f"{where('val', mix['seeds'], mix['machine'])} at twice the audio encoder's FLOPs: not adopted."),
        "bench_band_methods.py": (
            f"It lifts the joint upper bound's audio (final {pm(b16['joint']['audio']['final_accuracy'])} % at 16 kHz against "
            f"{pm(b8['joint']['audio']['final_accuracy'])} % at 8 kHz) and leaves CIGN's audio-visual average within seed noise "
            f"({pm(b16['cign']['audio_visual']['average_accuracy'])} against {pm(b8['cign']['audio_visual']['average_accuracy'])}) "
            f"{where('test', load(BAND8)['seeds'], load(BAND8)['machine'])}."),
        "bench_encoder_lr.py": (
            f"No. At 6e-4 joint's audio final is {lr_ms('6e-4', 'joint', 'final_audio')} % against "
            f"{lr_ms('none', 'joint', 'final_audio')} % at the preset's rate, within the seeds' spread, while CIGN's worst "
            f"just-learned task falls to {lr_ms('6e-4', 'cign', 'worst_just_learned_audio_visual')} % "
            f"{where('val', lr_by[('none', 'joint')]['seeds'], lr['label'].split(' (')[0])}; a lent GPU's seeds agree. The preset "
            "keeps one rate."),
        "bench_first_step.py": (
            f"With the raw table eq 8's KL is {fs['kl_table'][0]:.4f} (the student's table is a copy), with contextual tokens "
            f"{pm(fs['kl_contextual'], 3)}; with `label` negatives eq 9's positive already wins by token identity (p_pos "
            f"{fs['label_p_pos_a'][0]:.2f} audio), with `maxpool` ones it does not ({fs['maxpool_p_pos_a'][0]:.2f}) "
            f"{where(fsd['split'], fsd['seeds'], fsd['machine'])}. These chose the default readings "
            f"([paper-choices.md]({ctx.href('docs/paper-choices.md')}))."),
        "bench_head_probe.py": (
            f"For `joint` nearly all of the audio: a probe on its frozen audio features reaches {v(best_probe('joint'))} % against the "
            f"head's {v(hmean('joint', 'head_audio'))} %, so the encoder is the limit; for CIGN after the last task the probe reaches "
            f"{v(best_probe('cign'))} % against {v(hmean('cign', 'head_audio'))} %: those points are lost in the continual head "
            f"{where(hpd['split'], [int(s) for s in next(iter(hp.values()))], hpd['machine'])}, means over seeds."),
        "bench_joint_epochs.py": (
            f"Twice the preset's epochs lift joint's audio final from {pm(je_a[0])} % to {pm(je_a[-1])} % "
            f"{where('test', jed['seeds'], jed['machine'])}; the methods table keeps the schedule every method shares."),
        "bench_pretrain.py": (
            f"No objective moves the embeddings towards the digits (val k-means NMI at most {max(nmi):.2f} after training, "
            f"{min(nmi0):.2f}-{max(nmi0):.2f} after the first epoch), and CIGN started from the best checkpoint reaches an audio-visual average of "
            f"{' / '.join(v(c['average_accuracy']['audio_visual']) for c in ptd)} % against "
            f"{' / '.join(v(c['average_accuracy']['audio_visual']) for c in scratch)} % from scratch, its visual branch near chance "
            f"{where(pt['split'], [c['seed'] for c in ptd], pt['device'])}; the default run trains from scratch."),
        "bench_task_probe.py": (
            f"A first task of one class leaves both heads flat (logit spread {min(one):.2f}-{max(one):.2f} after it, against "
            f"{min(two):.2f}-{max(two):.2f} after a two-class first task) {where(tpd['split'], [int(s) for s in next(iter(tp.values()))], tpd['machine'])}, "
            "as eq 8's BCE is minimised by a constant; later one-class tasks give the token CE nothing to separate, and the visual "
            "head stays flat on the seeds that lose the branch."),
        "bench_visual_readout.py": (
            f"The max over locations ({pm(mean_std(readout_final(vr, 'max')))} % after {vr['epochs']} epochs, against "
            f"{pm(mean_std(readout_final(vr, 'mean')))} % for the mean); a cross-modal InfoNCE with a perfect audio side teaches as much "
            f"through it ({pm(mean_std(readout_final(vr, 'nce_max')))} %) but not through the best location "
            f"({pm(mean_std(readout_final(vr, 'nce_mil')))} %) {where(vr['split'], vr_seeds, vr['machine'])}. With both encoders random "
            "nothing starts."),
        "train_step_profile.py": (
            f"A `cpu`-preset step (batch {prof['batch']}) takes {runs['avx2']['step_ms']:.0f} ms in fp32 on the AVX2 code path, "
            f"{runs['native-fp32']['step_ms']:.0f} ms in fp32 natively and {runs['native']['step_ms']:.0f} ms in "
            f"{runs['native']['precision']} ({short_cpu(prof['machine'])}, {prof['steps']} steps): the AVX2 step is the fp32 step, "
            f"not a slower one. Convolutions (forward and backward) take {conv['avx2']:.0f} ms of the AVX2 step, the transformer's "
            f"and heads' matrix products {mm['avx2']:.0f} ms; forward and backward alone, the visual encoder "
            f"{runs['avx2']['visual_encoder_ms']:.0f} ms, the audio encoder {runs['avx2']['audio_encoder_ms']:.0f} ms, the rest of "
            f"the model {runs['avx2']['after_encoders_ms']:.0f} ms."),
        "visual_stride.py": (
            f"No. Stride 2 halves a step ({f(vs1['step']['gflop'])} -> {f(vs2['step']['gflop'])} GFLOP; "
            f"{f(vs1['step']['avx2_ms'], 0)} -> {f(vs2['step']['avx2_ms'], 0)} ms in fp32 on AVX2) but CIGN's visual final "
            f"accuracy falls from {pm(vs1['summary']['final_visual'])} % to {pm(vs2['summary']['final_visual'])} % "
            f"{where(vsd['split'], vsd['seeds'], vsd['machine'])}: the digits need the full-resolution map. The preset keeps "
            "stride 1; `--visual-stride 2` is there for a faster, less accurate run."),
        "fp16_arithmetic.py": fp16_answer(),
        "hard_audio.py": hard_audio_answer(),
        "onednn_bf16_conv_grad.py": (
            (f"On {', '.join(nan_cpus)}: yes, at some batches of a few clips, never in fp32 or with oneDNN disabled. " if nan_cpus else "")
            + (f"On {', '.join(clean_cpus)}: never, at any batch probed, in either layout. " if clean_cpus else "")
            + "The trainer guards against it on every CPU (`cign_train/guard.py`)."),
    }


STUDY_ROWS = (
    ("bench_audio_probe.py", "What lifts the `cpu` preset's audio encoder on avdigits (an audio-only probe)?", PROBE_FILES),
    ("bench_band_methods.py", "Does the 16 kHz band change CIGN, fine-tuning and joint training in full runs?", ("audio_8k/",)),
    ("bench_encoder_lr.py", "Does a faster learning rate for the audio encoder lift the joint run's audio?", ("encoder_lr_avdigits.json",)),
    ("bench_first_step.py", "What do eqs 8-9 see at the first step of a new task, under each reading?", ("first_step_avdigits.json",)),
    ("bench_head_probe.py", "Does a run's grouping head read all its encoders hold?", ("head_probe_avdigits.json",)),
    ("bench_joint_epochs.py", "How far does the joint upper bound's audio rise when it trains longer?", ("joint_epochs_avdigits.json",)),
    ("bench_pretrain.py", "Does `cign-pretrain` learn on avdigits, and do its encoders help CIGN?",
     ("pretrain_avdigits.json", "pretrain_simclr_ezvsl_avdigits.json")),
    ("bench_task_probe.py", "Why does CIGN's 10-task avdigits run lose its visual branch?", ("task_probe_avdigits.json",)),
    ("bench_visual_readout.py", "Which read-out of the visual encoder learns avdigits' digits from scratch?", ("visual_readout_avdigits.json",)),
    ("fp16_arithmetic.py", "What do float16 layers cost the FP16 and INT8 (TensorRT) graphs in float16 arithmetic?",
     ("fp16_arithmetic.json",)),
    ("hard_audio.py", "With one audio location, what does hard assignment do to the audio branch that soft assignment does not?",
     ("hard_audio_avdigits.json",)),
    ("onednn_bf16_conv_grad.py", "Does oneDNN's bf16 convolution weight-gradient return NaN at small batches on this CPU?",
     ("onednn_bf16_conv_grad.json",)),
    ("train_step_profile.py", "Where does a training step's time go on AVX2 in fp32, against the native bf16 step?",
     ("train_step_profile.json",)),
    ("visual_stride.py", "Can a strided first visual convolution shed the AVX2 step's FLOPs without losing accuracy?",
     ("visual_stride.json",)),
)


def gen_studies(ctx: Ctx) -> str:
    answers = study_answers(ctx)
    rows = []
    for script, question, files in STUDY_ROWS:
        links = ", ".join(f"[`{x}`]({ctx.href(rel_study(x))})" for x in files)
        rows.append([f"[`{script}`]({ctx.href('benchmarks/studies/' + script)})", question, answers[script], links])
    return table(["study", "question", "answer", "results"], rows, ["---"] * 4)


TORCH_PARITY = (f"{RESULTS}/torch_parity_cpu.json", f"{RESULTS}/torch_parity_cuda.json")


def gen_torch_parity(ctx: Ctx) -> str:
    """The torch backends against onnxruntime fp32 per device, precision and mode (worst export, lowest agreement)."""
    rels = [r for r in TORCH_PARITY if (ROOT / r).is_file()] or [TORCH_PARITY[0]]
    rows, captions = [], []
    for rel in rels:
        d = load(rel)
        groups: dict = {}
        for r in d["rows"]:
            groups.setdefault((r["precision"], r["mode"]), []).append(r)
        for (precision, mode), rs in groups.items():
            rows.append([f"torch-{d['device']}", precision, mode, f"{d['tolerances'][precision]:g}",
                         " / ".join(f"{max(r['outputs'][o]['max_abs_diff'] for r in rs):.1e}" for o in ("p_audio", "p_visual", "p_av")),
                         " / ".join(f"{100 * min(r['outputs'][o]['top1_agreement'] for r in rs):.1f}" for o in ("p_audio", "p_visual", "p_av")),
                         f"{sum(r['accuracy'] for r in rs) / len(rs):.1f} / {sum(r['accuracy_fp32_onnx'] for r in rs) / len(rs):.1f}"])
        gpu = d["machine"].get("gpu")
        exports = sorted({r["export"] for r in d["rows"]})
        captions.append(f"torch-{d['device']}: {', '.join(f'`{e}`' for e in exports)} ({rs[0]['classes']} classes, "
                        f"{rs[0]['clips']} test clips each), batch {rs[0]['batch']}, {cpu_label(d['machine'])}"
                        + (f", {gpu['name']}" if gpu and d["device"] == "cuda" else ""))
    return "\n".join([table(["backend", "precision", "mode", "tolerance", "max diff p_audio / p_visual / p_av",
                             "top-1 agreement % p_audio / p_visual / p_av", "AV accuracy % torch / onnx fp32"], rows,
                            ["---", "---", "---", "---:", "---:", "---:", "---:"]), "",
                      ctx.source(rels, "trained avdigits models (`cpu` preset), worst export per row", *captions)])


GPU_LATENCY = (f"{RESULTS}/gpu_latency_paper.json", f"{RESULTS}/gpu_latency_paper_compile.json",
               f"{RESULTS}/gpu_latency_avdigits.json")


def gen_gpu(ctx: Ctx) -> str:
    """Batch-1 latency on a GPU per backend, precision and mode, from ``make bench-gpu``'s cign-bench runs."""
    rels = [r for r in GPU_LATENCY if (ROOT / r).is_file()]
    if not rels:
        return ("No GPU latency run is recorded in `benchmarks/results/`: `make bench-gpu` takes these numbers on a "
                "machine with a CUDA GPU.")
    rows, captions = [], []
    for rel in rels:
        d = load(rel)
        for r in d["rows"]:
            if r["batch"] != 1:
                continue
            rows.append([model_name(d), r["backend"] + (f" {r['mode']}" if r.get("mode") else ""), r["precision"],
                         f(r["median_ms"], 3), f(r["p99_ms"], 3), f(r["max_ms"], 3),
                         f(r["floor_ms"], 3) if "floor_ms" in r else "–",
                         f(r["setup_s"], 1) if "setup_s" in r else "–",
                         f(r["gpu_memory_peak_mib"], 0) if "gpu_memory_peak_mib" in r else "–"])
        env = d["environment"]
        captions.append(f"{Path(rel).name}: {env['gpu']['name']} (driver {env['gpu']['driver']}), torch "
                        f"{env['versions']['torch']}, {d['iterations']} timed calls, host {cpu_label(env)}; GPU peaks "
                        + ", ".join(f"{p} {v:.0f} TFLOP/s" for p, v in d.get("gpu_peak_tflops", {}).items()))
    return "\n".join([table(["model", "backend", "precision", "median ms", "p99 ms", "max ms", "floor ms",
                             "first output s", "GPU MiB"], rows, ["---", "---", "---"] + ["---:"] * 6), "",
                      ctx.source(rels, "`make bench-gpu`, batch 1", *captions)])


GENERATORS = {
    "headline": gen_headline, "demo_time": gen_demo_time, "methods": gen_methods, "methods_val": gen_methods_val,
    "current": gen_current, "ablation": gen_ablation, "ablation_diag": lambda ctx: gen_diag(ctx, ABLATION), "depth": gen_depth,
    "buffer": gen_buffer, "tasks": gen_tasks, "tsne": gen_tsne, "default_run": gen_default_run, "train_cpu": gen_train_cpu,
    "guard": gen_guard, "guard_inline": gen_guard_inline, "train_gpu": gen_train_gpu, "data": gen_data,
    "export_latency": gen_export_latency, "normalization": gen_normalization, "export_accuracy": gen_export_accuracy,
    "latency": gen_latency, "avx2_peaks": gen_avx2_peaks, "latency_profile": gen_latency_profile, "live": gen_live, "live_goals": gen_live_goals, "soak": gen_soak,
    "first_step": gen_first_step, "onednn": gen_onednn, "audio_probe": gen_audio_probe, "band": gen_band,
    "encoder_lr": gen_encoder_lr, "first_step_table": gen_first_step_table, "head_probe": gen_head_probe,
    "joint_epochs": gen_joint_epochs, "pretrain": gen_pretrain, "task_probe": gen_task_probe, "visual_readout": gen_visual_readout,
    "visual_stride": gen_visual_stride, "avx2_demo": gen_avx2_demo, "studies": gen_studies,
    "enroll": gen_enroll, "enroll_sweep": gen_enroll_sweep, "enroll_swap": gen_enroll_swap, "enroll_time": gen_enroll_time, "enroll_seeds": gen_enroll_seeds,
    "torch_parity": gen_torch_parity, "gpu": gen_gpu, "hard_audio": hard_audio_text, "readings": lambda ctx: gen_variants(ctx, READINGS), "readings_diag": lambda ctx: gen_diag(ctx, READINGS),
    "scales": lambda ctx: gen_variants(ctx, SCALES), "scales_diag": lambda ctx: gen_diag(ctx, SCALES), "scarce": gen_scarce,
    "compare": lambda ctx, dataset: gen_variants(ctx, dataset, "replay"),
}


# ------------------------------------------------------------------------------------------ driver

def render(page: Path, text: str) -> tuple[str, list[str]]:
    """The page with every block regenerated, and the problems found (unknown block, missing JSON)."""
    ctx, problems = Ctx(page), []

    def sub(m: re.Match) -> str:
        name, args = m["name"], m["args"]
        gen = GENERATORS.get(name)
        if gen is None:
            problems.append(f"{page}: unknown block report:{name}")
            return m[0]
        try:
            out = gen(ctx, *args.split())
        except MissingResult as e:
            problems.append(f"{page}: block report:{name} reads {e.args[0]}, which is missing")
            return m[0]
        body = f"\n\n{out.strip()}\n\n" if "\n" in out else out
        return f"<!-- report:{name}{args} -->{body}<!-- /report:{name} -->"

    return BLOCK.sub(sub, text), problems


def stale_blocks(old: str, new: str) -> list[str]:
    olds = {(m["name"], m["args"]): m["body"] for m in BLOCK.finditer(old)}
    return sorted({name + args for (name, args), body in {(m["name"], m["args"]): m["body"] for m in BLOCK.finditer(new)}.items()
                   if olds.get((name, args)) != body})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming every page that differs from the JSON")
    a = ap.parse_args(argv)
    failed = False
    for page in pages():
        path = ROOT / page
        if not path.is_file():
            print(f"missing page: {page}", file=sys.stderr)
            failed = True
            continue
        text = path.read_text()
        new, problems = render(page, text)
        for p in problems:
            print(p, file=sys.stderr)
        failed |= bool(problems)
        if new != text:
            if a.check:
                print(f"{page}: differs from the JSON in block(s) {', '.join(stale_blocks(text, new))}; run python benchmarks/report.py",
                      file=sys.stderr)
                failed = True
            else:
                path.write_text(new)
                print(f"rewrote {page}")
    if a.check and not failed:
        print(f"{len(pages())} pages match the JSON")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
