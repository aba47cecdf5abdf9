"""Wall time of ``make demo`` after set-up, stage by stage, natively and on the AVX2 instruction set.

The budget: ``make demo`` takes <= 10 min after set-up on a 2-core CPU of either kind, with native
bf16 (AVX512-BF16 / AMX, where ``--amp auto`` trains in bf16) and with AVX2 only (fp32). On a bf16
machine both are measured: as is, and with the CPUID mask (``cign_runtime.isa``) applied to every
stage, so that torch, oneDNN, numpy, onnxruntime and the codecs run their AVX2 code as on an
AVX2-only CPU. The stages are the Makefile's own ``demo`` commands (read from ``make -n demo``; the
``setup`` prerequisite is left out), run in a fresh working folder per kind (``--runs``), from
nothing: no data, run or export. Each kind then runs the commands a second time, as a user
repeating ``make demo`` would (``cign-train --reuse`` reports the finished run). Per stage: seconds
and exit status; per kind: the training run's test accuracy and ``cign-live``'s top-1 of p_av.
Writes ``benchmarks/results/demo.json``; each stage's output is kept in ``RUNS/KIND/pass*.log``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import machine
from bench_default_run import autocast

from cign_runtime import isa

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
BUDGET_S = 600
#: What each of the demo's commands does, by the module or script it runs.
STAGES = {"cign_train.cli.prepare": "generate + prepare", "cign_train.cli.train": "train",
          "cign_export.cli": "export", "demo_live.py": "live"}
#: The run folder the Makefile's demo trains into (relative to the working folder).
RUN = "runs/avdigits-cign-seed0"


def demo_commands(python: str) -> list[tuple[str, list[str]]]:
    """(stage, argv) of each ``make demo`` command after set-up, as the Makefile runs them with ``python``;
    a path into this checkout (``scripts/...``) is made absolute, so the commands run from any folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    lines = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"PYTHON={python}", "demo"],
                           env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    commands = []
    for line in lines:
        argv = shlex.split(line)
        if not argv or "setup.sh" in line:
            continue
        argv = [str(ROOT / a) if not a.startswith("-") and (ROOT / a).is_file() else a for a in argv]
        stage = next((name for key, name in STAGES.items() if any(a == key or a.endswith(key) for a in argv)), None)
        if stage is None:
            raise SystemExit(f"make -n demo printed a command this benchmark does not know: {line}")
        commands.append((stage, argv))
    return commands


def run_pass(commands, env: dict, workdir: Path, log: Path) -> dict:
    """Run every stage once in ``workdir``; seconds and exit status per stage, stopping at a failure."""
    stages, text = {}, []
    for stage, argv in commands:
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
        stages[stage] = {"seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}
        text.append(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}")
        print(f"  {stage:<20}{stages[stage]['seconds']:>8.1f} s  rc {done.returncode}", flush=True)
        if done.returncode:
            break
    log.write_text("\n".join(text))
    return {"stages": stages, "seconds": round(sum(s["seconds"] for s in stages.values()), 1),
            "ok": all(s["returncode"] == 0 for s in stages.values()) and len(stages) == len(commands)}


def live_top1(log: Path) -> dict[str, float]:
    """``demo_live.py``'s printed top-1 per score (``p_av 18/20 = 90.0 %``), in %."""
    found = re.findall(r"^\s+(p_\w+)\s+\d+/\d+ = ([\d.]+) %", log.read_text(), re.M)
    return {key: float(value) for key, value in found}


def measure(kind: str, commands, runs: Path) -> dict:
    workdir = runs / kind
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = isa.environ(kind)
    result = {"cpu_isa": kind}
    for n in (1, 2):
        print(f"{kind}, pass {n}:", flush=True)
        result[f"pass{n}"] = run_pass(commands, env, workdir, workdir / f"pass{n}.log")
        if not result[f"pass{n}"]["ok"]:
            raise SystemExit(f"make demo failed ({kind}, pass {n}); see {workdir / f'pass{n}.log'}")
    metrics = json.loads((workdir / RUN / "metrics.json").read_text())
    config = json.loads((workdir / RUN / "config.json").read_text())
    result |= {"amp": config["amp"], "autocast": autocast(kind), "eval_split": metrics["eval_split"], "seed": config["seed"],
               "average_accuracy": metrics["average_accuracy"], "final_accuracy": metrics["final_accuracy"],
               "live_top1": live_top1(workdir / "pass1.log")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", choices=isa.ISAS, default=list(isa.ISAS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/bench-demo", help="a working folder per kind")
    ap.add_argument("--output", type=Path, default=RESULTS / "demo.json")
    args = ap.parse_args()
    for kind in args.kinds:
        reason = isa.unavailable(kind)
        if reason:
            raise SystemExit(f"--kinds {kind}: {reason}")
    commands = demo_commands(sys.executable)
    info = machine.describe()
    results = {kind: measure(kind, commands, args.runs.resolve()) for kind in args.kinds}
    print(f"\nmake demo after set-up on {machine.label(info)}")
    stages = [stage for stage, _ in commands]
    print(f"{'kind':<8}{'pass':>5}" + "".join(f"{s:>20}" for s in stages) + f"{'total':>9}")
    for kind, r in results.items():
        for n in (1, 2):
            p = r[f"pass{n}"]
            print(f"{kind:<8}{n:>5}" + "".join(f"{p['stages'][s]['seconds']:>19.0f}s" for s in stages)
                  + f"{p['seconds']:>8.0f}s")
    doc = {"machine": info, "budget_s": BUDGET_S, "date": time.strftime("%Y-%m-%d"),
           "commands": [shlex.join(argv).replace(str(ROOT) + "/", "") for _, argv in commands], "kinds": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
