"""Every GPU number of the project in one run of at most 8 minutes on an H100 / H200 (``make bench-gpu``).

Runs, in this order, each step a subprocess of this interpreter with a time budget:

1. ``smi-before``: ``nvidia-smi`` (GPU, driver, CUDA, memory, clocks, power limit, temperature, persistence mode);
2. ``bench-paper``: ``cign-bench --preset paper --classes 100`` on torch-cuda (eager and CUDA graph), ort-cuda,
   ort-trt and trt, fp32 / fp16 / bf16, batch 1, 1000 calls -> ``gpu_latency_paper.json``;
3. ``data``: ``cign-prepare --dataset avdigits`` (generates and prepares the embedded data when missing);
4. ``train``: the default ``cign-train`` with ``--device cuda``: wall time and accuracy -> ``gpu_default_run.json``;
5. ``export``: ``cign-export`` of that run's last task, fp32 + FP16;
6. ``bench-avdigits``: ``cign-bench --model`` on that export, as in 2 -> ``gpu_latency_avdigits.json``;
7. ``parity``: ``bench_torch_parity.py --device cuda`` on that export's test clips -> ``torch_parity_cuda.json``;
8. ``tests``: ``pytest -m cuda`` (passed / failed / skipped from its JUnit XML);
9. ``bench-train``: ``benchmarks/bench_train.py --device cuda`` (both presets, fp32 and bf16) -> ``gpu_train.json``;
10. ``bench-compile``: step 2 in bf16 through ``torch.compile``, per call and in a CUDA graph (each mode
    compiles, the slowest step to start) -> ``gpu_latency_paper_compile.json``;
11. ``smi-after``: ``nvidia-smi`` again (clocks and temperature after the load).

The latencies come first: the paper preset needs no data, and a run cut short keeps what finished, since
``gpu_check.json`` (environment, clocks, per step its command, budget, wall time, status, outputs and output
tail) is rewritten after every step. The budgets add up to 480 s; a step's timeout is its budget plus what
the steps before it left unused, so the whole run stays within the total. A failed step is recorded and the
steps that do not need it still run; the exit status is 1 when any step did not succeed. Results go to
``benchmarks/results/gpu_*.json`` (``--results``), logs and scratch to ``runs/gpu-check/`` (``--scratch``).

Without a CUDA GPU it exits with status 2 and writes nothing. ``--dry-run`` prints the plan and checks every
step's arguments against its command's own parser (click's, argparse's, pytest's) without running it;
``--only STEP[,STEP]`` runs a subset.

On a lent GPU machine without network (torch, onnx and onnxruntime installed), ``scripts/gpu_wheels.sh``
fetches the missing wheels here into ``.whl/`` and prints the command to run there; no setup, nothing
downloaded: ``make bench-gpu SKIP_SETUP=1``, or this script with ``PYTHONPATH`` naming the wheels' folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's packages, installed or not
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = Path("runs/gpu-check")
#: The whole run's budget: the sum of the steps' budgets may not exceed it.
TOTAL_BUDGET_S = 480
#: ``nvidia-smi --query-gpu`` fields; one the driver does not know is left out (queried alone, it fails).
SMI_FIELDS = ("name", "driver_version", "pci.bus_id", "compute_cap", "memory.total", "memory.used", "clocks.current.sm",
              "clocks.current.memory", "clocks.max.sm", "clocks.max.memory", "power.draw", "power.limit",
              "temperature.gpu", "persistence_mode", "pstate", "utilization.gpu", "compute_mode")
#: What cign-bench times on the GPU: every GPU backend and precision, torch eager and CUDA graph, batch 1.
BENCH_ARGS = ("--backends", "torch-cuda,ort-cuda,ort-trt,trt", "--precision", "fp32,fp16,bf16", "--torch-modes",
              "eager,graph", "--batch", "1", "--iterations", "1000", "--warmup", "50")
#: torch.compile, launched per call and captured in a CUDA graph: one precision (each costs a compilation).
COMPILE_ARGS = ("--backends", "torch-cuda", "--precision", "bf16", "--torch-modes", "compile,compile-graph",
                "--batch", "1", "--iterations", "1000", "--warmup", "50")


class StepFailed(Exception):
    """A step ran but its outputs say it did not do its job (raised by a step's ``collect``)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One subprocess of the plan, run from the checkout's root."""

    name: str
    argv: tuple[str, ...]
    budget_s: int
    writes: tuple[Path, ...]
    needs: tuple[str, ...] = ()
    #: Folders the step creates that later steps read (the dry run stands in an empty folder for each).
    makes: tuple[Path, ...] = ()
    #: Removed before the step runs, so that it starts fresh (and stale files are not taken for its own).
    clean: tuple[Path, ...] = ()
    #: Return codes that count as success (before ``collect``).
    ok_codes: tuple[int, ...] = (0,)
    #: After the step ran: reads its outputs (``record`` holds wall_s, returncode), writes results, returns a
    #: summary for gpu_check.json; raises StepFailed when the outputs show a failure.
    collect: Callable[[dict], dict] | None = None


def rel(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (the steps run from there)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT)) if path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def python_m(module: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)


def script(path: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, path, *args)


def plan(results: Path = RESULTS, scratch: Path = SCRATCH) -> list[Step]:
    """The steps, in the order they run."""
    results, scratch = Path(results), Path(scratch)
    run, export = scratch / "avdigits-cign-seed0", scratch / "export-avdigits"
    bench_paper, bench_avdigits, bench_compile = (scratch / n for n in ("bench-paper", "bench-avdigits", "bench-compile"))
    junit = scratch / "pytest-cuda.xml"
    smi = [scratch / f"smi_{when}.json" for when in ("before", "after")]
    return [
        Step("smi-before", script("benchmarks/gpu_check.py", "--smi", rel(smi[0])), 10, (smi[0],), collect=read_json(smi[0])),
        Step("bench-paper", python_m("cign_export.bench_cli", "--preset", "paper", "--classes", "100", *BENCH_ARGS,
                                     "--out", rel(bench_paper)), 60, (results / "gpu_latency_paper.json",),
             clean=(bench_paper,), collect=copy_bench(bench_paper, results / "gpu_latency_paper.json")),
        Step("data", python_m("cign_train.cli.prepare", "--dataset", "avdigits"), 25, ()),
        Step("train", python_m("cign_train.cli.train", "--device", "cuda", "--out", rel(run), "--no-progress"), 85,
             (results / "gpu_default_run.json",), needs=("data",), makes=(run,), clean=(run,),
             collect=default_run(run, results / "gpu_default_run.json")),
        Step("export", python_m("cign_export.cli", "--run", rel(run), "--task", "4", "--fp16", "--out", rel(export)), 20,
             (export / "manifest.json",), needs=("train",), makes=(export,), clean=(export,),
             collect=export_report(export)),
        Step("bench-avdigits", python_m("cign_export.bench_cli", "--model", rel(export), *BENCH_ARGS,
                                        "--out", rel(bench_avdigits)), 45, (results / "gpu_latency_avdigits.json",),
             needs=("export",), clean=(bench_avdigits,),
             collect=copy_bench(bench_avdigits, results / "gpu_latency_avdigits.json")),
        Step("parity", script("benchmarks/bench_torch_parity.py", "--device", "cuda", "--export", rel(export),
                              "--output", rel(results / "torch_parity_cuda.json")), 40,
             (results / "torch_parity_cuda.json",), needs=("export",)),
        Step("tests", python_m("pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                               f"--junitxml={rel(junit)}"), 85, (junit,), clean=(junit,), ok_codes=(0, 1),
             collect=junit_counts(junit)),
        Step("bench-train", script("benchmarks/bench_train.py", "--device", "cuda", "--steps", "20", "--output",
                                   rel(results / "gpu_train.json")), 25, (results / "gpu_train.json",),
             collect=train_rates(results / "gpu_train.json")),
        Step("bench-compile", python_m("cign_export.bench_cli", "--preset", "paper", "--classes", "100", *COMPILE_ARGS,
                                       "--out", rel(bench_compile)), 80, (results / "gpu_latency_paper_compile.json",),
             clean=(bench_compile,), collect=copy_bench(bench_compile, results / "gpu_latency_paper_compile.json")),
        Step("smi-after", script("benchmarks/gpu_check.py", "--smi", rel(smi[1])), 5, (smi[1],), collect=read_json(smi[1])),
    ]


# ---- what each step leaves behind ----------------------------------------------------------------------------

def at_root(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


def read_json(path: Path) -> Callable[[dict], dict]:
    def collect(record: dict) -> dict:
        return json.loads(at_root(path).read_text())
    return collect


def copy_bench(out: Path, dest: Path) -> Callable[[dict], dict]:
    """cign-bench's bench.json copied to ``dest``; its rows in brief. No row at all (every configuration skipped)
    is a failure: no GPU number came out of it."""
    def collect(record: dict) -> dict:
        source = at_root(out) / "bench.json"
        if not source.is_file():
            raise StepFailed(f"{rel(source)} was not written")
        result = json.loads(source.read_text())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dest)
        rows = [{k: r.get(k) for k in ("backend", "precision", "mode", "batch", "median_ms", "p99_ms", "setup_s")}
                for r in result.get("rows", [])]
        skipped = [f"{s['backend']} {s['precision']}{' ' + s['mode'] if s.get('mode') else ''}: {s['reason']}"
                   for s in result.get("skipped", [])]
        summary = {"rows": rows, "skipped": skipped}
        if not rows:
            raise StepFailed(f"no configuration ran ({len(skipped)} skipped: {'; '.join(skipped)[:500]})")
        return summary
    return collect


def default_run(run: Path, dest: Path) -> Callable[[dict], dict]:
    """The default run's wall time (the cign-train process, start to end) and accuracy, as bench_default_run.py
    records them, to ``dest``."""
    def collect(record: dict) -> dict:
        metrics = json.loads((at_root(run) / "metrics.json").read_text())
        config = json.loads((at_root(run) / "config.json").read_text()) if (at_root(run) / "config.json").is_file() else {}
        try:
            import torch

            from cign_train.precision import autocast_dtype
            autocast = str(autocast_dtype(config.get("amp") or "auto", torch.device("cuda")))
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            autocast = f"unknown ({e})"
        doc = {"machine": environment(), "command": shlex.join(display(record["argv"])), "seconds": record["wall_s"],
               "autocast": autocast, "eval_split": metrics["eval_split"],
               "average_accuracy": metrics["average_accuracy"], "final_accuracy": metrics["final_accuracy"],
               "diagonal": metrics["diagonal"], "guarded_steps": metrics.get("guarded_steps")}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(doc, indent=1) + "\n")
        return {k: doc[k] for k in ("seconds", "autocast")} | {
            "av_average": metrics["average_accuracy"]["audio_visual"], "av_final": metrics["final_accuracy"]["audio_visual"]}
    return collect


def export_report(export: Path) -> Callable[[dict], dict]:
    def collect(record: dict) -> dict:
        if not (at_root(export) / "manifest.json").is_file():
            raise StepFailed(f"{rel(export)}/manifest.json was not written")
        report = at_root(export) / "report.json"
        test = json.loads(report.read_text()).get("accuracy", {}).get("test", {}) if report.is_file() else {}
        return {"av_test_accuracy": {p: a.get("audio_visual") for p, a in test.items()}}
    return collect


def train_rates(path: Path) -> Callable[[dict], dict]:
    def collect(record: dict) -> dict:
        rows = json.loads(at_root(path).read_text())["rows"]
        return {"samples_per_s": {f"{r['preset']} {r['precision']} b{r['batch']}": r["samples_per_s"] for r in rows}}
    return collect


def junit_counts(path: Path) -> Callable[[dict], dict]:
    """Passed / failed / errors / skipped of the CUDA tests from pytest's JUnit XML. Modules that cannot be imported
    here (``--continue-on-collection-errors``: e.g. sounddevice without PortAudio) are listed, not counted as
    failures; a failed or erroring test, or no test passed, fails the step."""
    def collect(record: dict) -> dict:
        if not at_root(path).is_file():
            raise StepFailed(f"pytest wrote no {rel(path)} (return code {record['returncode']})")
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failed, uncollected = [], []
        for case in ET.parse(at_root(path)).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
            elif outcome.tag == "error" and "collection failure" in (outcome.get("message") or ""):
                last = (outcome.text or "").strip().splitlines()[-1:] or [""]
                uncollected.append(f"{name}: {last[0]}"[:300])
            else:
                counts["failed" if outcome.tag == "failure" else "errors"] += 1
                failed.append(name)
        summary = {**counts, "failing": failed[:30], "not_collected": uncollected}
        if failed:
            raise StepFailed(f"{len(failed)} test(s) failed or erred: {', '.join(failed[:10])}")
        if not counts["passed"]:
            raise StepFailed(f"no CUDA test passed ({counts}; return code {record['returncode']})")
        return summary
    return collect


# ---- nvidia-smi --------------------------------------------------------------------------------------------

def _smi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20)


def _value(text: str):
    text = text.strip()
    if text.startswith("[") or text in ("N/A", ""):  # [N/A], [Not Supported]
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def query_gpu() -> dict:
    """``nvidia-smi --query-gpu`` of :data:`SMI_FIELDS` per GPU (a field this driver lacks is dropped) and the CUDA
    version from its header."""
    def query(fields) -> list[list[str]] | None:
        p = _smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
        return [line.split(", ") for line in p.stdout.strip().splitlines()] if p.returncode == 0 else None

    fields = list(SMI_FIELDS)
    rows = query(fields)
    if rows is None:  # some field unknown to this driver: keep those that answer alone
        fields = [f for f in SMI_FIELDS if query([f]) is not None]
        rows = query(fields) if fields else None
    if rows is None:
        raise RuntimeError(f"nvidia-smi --query-gpu failed: {_smi('--query-gpu=name', '--format=csv').stderr.strip()}")
    header = _smi().stdout
    cuda = re.search(r"CUDA (?:UMD )?Version:\s*([\d.]+)", header)
    return {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cuda_version": cuda.group(1) if cuda else None,
            "gpus": [dict(zip(fields, map(_value, row))) for row in rows],
            "missing_fields": [f for f in SMI_FIELDS if f not in fields]}


# ---- environment ---------------------------------------------------------------------------------------------

#: Modules whose presence decides what can run (the GPU images lack some of them).
MODULES = ("av", "soxr", "sounddevice", "espeakng_loader", "onnxscript", "onnxruntime", "tensorrt", "cuda", "pytest")


def environment() -> dict:
    """``cign_runtime.bench.environment()`` plus torch, its CUDA, the GPU and what is importable."""
    from cign_runtime import bench

    env = bench.environment()
    try:
        import torch

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                        "cuda_available": torch.cuda.is_available()}
    except ImportError as e:
        env["torch"] = {"error": str(e)}
    env["modules"] = {m: importlib.util.find_spec(m) is not None for m in MODULES}
    env["c_compiler"] = shutil.which("cc") or shutil.which("gcc")  # torch.compile's Triton builds its launchers with it
    with contextlib.suppress(Exception):
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    env["torch_runner"] = [str(e.value) for e in importlib.metadata.entry_points(group="cign_runtime.runners")]
    return env


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (no torch, no CUDA GPU), or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    return None


def metadata_shim(folder: Path) -> Path | None:
    """A ``dist-info`` folder carrying pyproject.toml's entry points when this interpreter does not see them (the
    checkout is on PYTHONPATH, not installed): ``cign_runtime.backends`` finds the torch backends' runner through
    one. Returns the folder to put on the steps' PYTHONPATH, or None when nothing is missing."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no reader for pyproject.toml here
        return None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {g: dict(eps) for g, eps in project.get("entry-points", {}).items()}
    missing = [(g, n) for g, eps in groups.items() for n in eps if not importlib.metadata.entry_points(group=g, name=n)]
    if not missing:
        return None
    groups["console_scripts"] = project.get("scripts", {})
    info = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items()) + "\n" for g, eps in groups.items() if eps))
    return folder


# ---- running ----------------------------------------------------------------------------------------------

def display(argv) -> list[str]:
    return ["python", *argv[1:]] if argv and argv[0] == sys.executable else list(argv)


def tail(path: Path, lines: int = 25, chars: int = 4000) -> str:
    """The last lines of a log, each progress bar (carriage returns) reduced to its last state."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
        text = f.read().decode(errors="replace")
    kept = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([ln for ln in kept if ln.strip()][-lines:])[-chars:]


def run_process(argv, timeout: float, log: Path, env: dict) -> tuple[int | None, float]:
    """Runs ``argv`` from the checkout's root, output to ``log``; (return code or None on timeout, seconds). A
    timeout ends the whole process group (the step's workers and compilers too)."""
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
            rc = None
    return rc, time.perf_counter() - start


def execute(steps: list[Step], results: Path, scratch: Path, describe_env: Callable[[], dict] = dict,
            echo: Callable[[str], None] = print) -> dict:
    """Runs ``steps`` in order and writes ``results/gpu_check.json`` (with ``describe_env()``) after each; returns
    that summary.

    Step i's timeout is the budgets of steps 1..i minus the time spent so far: at least its own budget, more when
    earlier steps finished early, and the run never outlasts the sum of the budgets. A step whose ``needs``
    (among these steps) did not succeed is skipped."""
    results, scratch = at_root(Path(results)), at_root(Path(scratch))
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shim = metadata_shim(scratch / "metadata")
    if shim:  # this process reads the entry points too (the environment's record)
        sys.path.insert(0, str(shim))
    paths = [str(p) for p in (shim, ROOT) if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    summary = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "budget_s": sum(s.budget_s for s in steps), "environment": describe_env(), "clocks": {}, "steps": [],
               "wall_s": 0.0}
    if shim:
        summary["metadata_shim"] = rel(shim)
    status: dict[str, str] = {}
    selected = {s.name for s in steps}
    start, deadline = time.perf_counter(), 0.0
    for step in steps:
        deadline += step.budget_s
        record = {"name": step.name, "argv": list(step.argv), "budget_s": step.budget_s, "needs": list(step.needs),
                  "timeout_s": None, "wall_s": 0.0, "status": "skipped", "returncode": None, "outputs": [],
                  "log": rel(logs / f"{step.name}.log"), "tail": "", "result": None}
        blocked = [n for n in step.needs if n in selected and status.get(n) != "ok"]
        if blocked:
            record["reason"] = f"needs {', '.join(blocked)}, which did not succeed"
        else:
            for path in map(at_root, step.clean):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            timeout = deadline - (time.perf_counter() - start)
            record["timeout_s"] = round(timeout, 1)
            echo(f"== {step.name} (budget {step.budget_s} s, timeout {timeout:.0f} s): {shlex.join(display(step.argv))}")
            began = time.time()
            rc, wall = run_process(step.argv, timeout, logs / f"{step.name}.log", env)
            record.update(wall_s=round(wall, 1), returncode=rc, tail=tail(logs / f"{step.name}.log"))
            if rc is None:
                record.update(status="timed out", reason=f"still running after {timeout:.0f} s")
            elif rc not in step.ok_codes:
                record.update(status="failed", reason=f"return code {rc}")
            else:
                record["status"] = "ok"
                if step.collect is not None:
                    try:
                        record["result"] = step.collect(record)
                    except StepFailed as e:
                        record.update(status="failed", reason=str(e))
                    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
                        record.update(status="failed", reason=f"reading its outputs: {type(e).__name__}: {e}")
            record["outputs"] = [rel(p) for p in step.writes if at_root(p).is_file() and at_root(p).stat().st_mtime >= began - 1]
            echo("\n".join(record["tail"].splitlines()[-12:]))
        status[step.name] = record["status"]
        echo(f"-- {step.name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else "")
             + f", {record['wall_s']:.0f} s")
        if step.name.startswith("smi-") and record["status"] == "ok":
            summary["clocks"][step.name.removeprefix("smi-")] = record["result"]
        summary["steps"].append(record)
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        (results / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict) -> str:
    lines = [f"{'step':<16}{'status':<11}{'wall s':>8}{'budget s':>10}  outputs"]
    for r in summary["steps"]:
        lines.append(f"{r['name']:<16}{r['status']:<11}{r['wall_s']:>8.0f}{r['budget_s']:>10}  "
                     + (", ".join(r["outputs"]) or r.get("reason", "-")))
    lines.append(f"{'total':<27}{summary['wall_s']:>8.0f}{summary['budget_s']:>10}")
    return "\n".join(lines)


# ---- the dry run: every step's arguments through its command's own parser ---------------------------------------

class _Parsed(Exception):
    pass


def _argparse_script(path: Path, args: list[str]) -> str | None:
    """Parses ``args`` with the ArgumentParser the script ``path`` builds, stopping it right after its
    ``parse_args`` (nothing of its work runs); the parser's error, or None."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, _args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_only
    sys.path.insert(0, str(path.parent))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit as e:
        return (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    except Exception as e:  # noqa: BLE001 - the script could not even be loaded
        return f"{type(e).__name__}: {e}"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(str(path.parent))
    return "the script returned without parsing its arguments"


def _click_command(module: str, args: list[str]) -> str | None:
    """Parses and type-checks ``args`` with the click command ``main`` of ``module`` (``make_context``: options,
    choices, types, paths, callbacks)."""
    import click

    try:
        command = importlib.import_module(module).main
    except (ImportError, AttributeError) as e:
        return f"cannot load {module}.main: {e}"
    if not isinstance(command, click.Command):
        return f"{module}.main is not a click command"
    try:
        ctx = command.make_context(module.rsplit(".", 1)[-1], list(args))
    except click.exceptions.Exit as e:
        return f"exits before running (code {e.exit_code})"
    except click.ClickException as e:
        return e.format_message()
    ctx.close()
    return None


def _pytest(args: list[str], tmp: Path) -> str | None:
    """pytest parses ``args`` (``--markers`` stops it before collecting); the ``cuda`` marker must be registered."""
    args = [re.sub(r"^--junitxml=.*", f"--junitxml={tmp / 'junit.xml'}", a) for a in args]
    p = subprocess.run([sys.executable, "-m", "pytest", "--markers", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0:
        said = (p.stderr + p.stdout).strip().splitlines()
        errors = [ln.strip() for ln in said if "error" in ln.lower() and "usage:" not in ln]
        return (errors or said or [f"pytest exited {p.returncode}"])[-1]
    marks = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"]
    missing = [m for m in marks if f"@pytest.mark.{m}:" not in p.stdout]
    return f"marker(s) {missing} not registered (pyproject.toml [tool.pytest.ini_options] markers)" if missing else None


def check_step(step: Step, stand_ins: dict[str, str], tmp: Path) -> str | None:
    """Why ``step``'s arguments would be refused, or None. Paths that earlier steps create are replaced by
    existing stand-ins, so ``click.Path(exists=True)`` checks them as it would at that point of the run."""
    argv = [stand_ins.get(a, a) for a in step.argv]
    if argv[0] != sys.executable:
        return f"runs {argv[0]}, not this interpreter"
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        return _pytest(args, tmp) if module == "pytest" else _click_command(module, args)
    path = at_root(Path(argv[1]))
    if not path.is_file():
        return f"no script {argv[1]}"
    if path.resolve() == Path(__file__).resolve():
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parser().parse_args(argv[2:])
        except SystemExit:
            return (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        return None
    return _argparse_script(path, argv[2:])


def validate(steps: list[Step], plan_names: set[str] | None = None) -> dict[str, str]:
    """{step name: why its arguments are invalid} for every invalid step, and plan errors under "plan": a name
    twice, a need that is no step of the plan (``plan_names``, default: these steps' names) or one of these
    steps that runs later, budgets over :data:`TOTAL_BUDGET_S`."""
    problems: dict[str, str] = {}
    names = [s.name for s in steps]
    plan_names = set(names) if plan_names is None else plan_names
    for i, step in enumerate(steps):
        if step.name in names[:i]:
            problems.setdefault("plan", f"step {step.name!r} appears twice")
        wrong = [n for n in step.needs if n not in plan_names or (n in names and n not in names[:i])]
        if wrong:
            problems.setdefault("plan", f"{step.name} needs {wrong}: no step of the plan that runs before it")
    if sum(s.budget_s for s in steps) > TOTAL_BUDGET_S:
        problems["plan"] = f"the budgets add up to {sum(s.budget_s for s in steps)} s, over {TOTAL_BUDGET_S} s"
    with tempfile.TemporaryDirectory() as tmp:
        stand_ins = {}
        for step in steps:
            for i, made in enumerate(step.makes):
                folder = Path(tmp) / f"{step.name}-{i}"
                folder.mkdir()
                stand_ins[rel(made)] = str(folder)
        for step in steps:
            why = check_step(step, stand_ins, Path(tmp))
            if why:
                problems[step.name] = why
    return problems


def describe(steps: list[Step]) -> str:
    lines = [f"{'#':>2}  {'step':<16}{'budget s':>9}  {'needs':<10}writes"]
    for i, s in enumerate(steps, 1):
        lines.append(f"{i:>2}  {s.name:<16}{s.budget_s:>9}  {','.join(s.needs) or '-':<10}"
                     f"{', '.join(rel(p) for p in s.writes) or '-'}")
        lines.append(f"{'':>4}$ {shlex.join(display(s.argv))}")
    lines.append(f"total budget {sum(s.budget_s for s in steps)} s (at most {TOTAL_BUDGET_S} s)")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check every step's arguments; run nothing")
    ap.add_argument("--only", help="run these steps (comma-separated names) and no others")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for gpu_*.json [default: benchmarks/results]")
    ap.add_argument("--scratch", type=Path, default=SCRATCH,
                    help="folder for runs, exports and logs, relative to the checkout [default: runs/gpu-check]")
    ap.add_argument("--smi", type=Path, help=argparse.SUPPRESS)  # internal: nvidia-smi's answer as JSON to this file
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.smi:
        try:
            info = query_gpu()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            print(f"nvidia-smi: {e}", file=sys.stderr)
            return 1
        at_root(a.smi).parent.mkdir(parents=True, exist_ok=True)
        at_root(a.smi).write_text(json.dumps(info, indent=1) + "\n")
        print(json.dumps(info["gpus"], indent=1), f"\nCUDA {info['cuda_version']}")
        return 0
    steps = plan(a.results.resolve(), a.scratch)
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in steps}]
        if unknown:
            ap.error(f"--only: unknown step(s) {unknown}; the steps: {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in names]
    if a.dry_run:
        print(describe(steps))
        problems = validate(steps, {s.name for s in plan()})
        print()
        for s in steps:
            print(f"{s.name:<16}{'INVALID: ' + problems[s.name] if s.name in problems else 'arguments ok'}")
        if "plan" in problems:
            print(f"plan: INVALID: {problems['plan']}")
        print(f"\n{'all steps valid' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    why = no_gpu_reason()
    if why:
        print(f"gpu_check: no CUDA GPU found: {why}. Nothing was run or written; it needs a machine with an NVIDIA "
              f"GPU. To see and check the plan here: python benchmarks/gpu_check.py --dry-run", file=sys.stderr)
        return 2
    summary = execute(steps, a.results.resolve(), a.scratch, environment)
    print("\n" + table(summary))
    print(f"wrote {rel(a.results.resolve() / 'gpu_check.json')}")
    return 0 if all(r["status"] == "ok" for r in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
