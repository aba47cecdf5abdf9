"""``cign-bench``: latency of an exported CIGN per backend, precision and batch, beside the hardware floor.

``cign-bench --model EXPORT_DIR`` times the export on every requested backend
(``cign_runtime.backends``: ort-cpu, ort-cuda, ort-trt, trt on its graphs; torch-cpu and
torch-cuda on its source checkpoint, in each ``--torch-modes`` mode: eager, CUDA graph,
torch.compile). ``cign-bench --preset cpu|paper`` first writes an export of a random-weight model
at the preset's shapes (``cign_export.preset``), with the graphs the requested backends run.
Timing, statistics, FLOPs, the CPU GEMM peaks and the environment come from ``cign_runtime.bench``;
this module only imports torch for ``--preset`` and the torch backends, so ``--model`` runs on a
runtime-only install.

Per configuration: latency min / median / mean / p90 / p95 / p99 / max and throughput (samples /
s); on a GPU also the host-to-device, compute and device-to-host parts (as trtexec splits them,
``split_times``); the floor, FLOPs / measured peak (on the CPU fp32 MatMul for fp32 / fp16 and
torch-cpu, u8 x s8 MatMulInteger for int8; on torch-cuda this GPU's dense matrix-product rate at
the row's precision, ``torch_backend.gpu_peak_tflops``), and latency / floor; torch backends also
the seconds to the first output and, on CUDA, the peak GPU memory. A backend or precision that cannot
run here is listed with the reason. ``--profile N`` adds, per onnxruntime CPU configuration, where
the time goes (``bench.op_profile``: per part, op type and node, with each kernel's rate against the
peak). ``--cpu-isa avx2`` re-runs the command with the AVX2-only instruction set
(``cign_runtime.isa``). Writes ``bench.json``, ``bench.md`` and ``bench.png`` (latency distribution
per configuration) under ``--out``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from cign_runtime import bench, isa
from cign_runtime import manifest as mf
from cign_runtime.backends import (PROVIDERS, TORCH_BACKENDS, TORCH_MODES, TORCH_PRECISIONS, BackendUnavailable,
                                   open_model)

#: ``--backends`` choices: PyTorch on the source checkpoint, then the runtime's graph backends.
BENCH_BACKENDS = (*TORCH_BACKENDS[::-1], *PROVIDERS, "trt")
#: ``--precision`` choices; "int8" means the backend's INT8 graph (int8-cpu on ort-cpu, int8-trt on GPUs).
BENCH_PRECISIONS = ("fp32", "fp16", "bf16", "int8", *mf.PRECISIONS[2:])


def resolve_precision(backend: str, precision: str) -> str:
    if precision == "int8" and backend not in TORCH_BACKENDS:
        return "int8-cpu" if backend == "ort-cpu" else "int8-trt"
    return precision


def configurations(a: dict) -> list[tuple[str, str, str | None, int]]:
    """(backend, precision, torch mode or None, batch) of every requested combination, in order, once each."""
    configs = [(b, resolve_precision(b, p), m if b in TORCH_BACKENDS else None, n)
               for b in a["backends"] for p in a["precision"] for m in a["torch_modes"] for n in a["batch"]]
    return list(dict.fromkeys(configs))


def inputs(spec, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames in [0, 255] and log spectrograms around the data's range, in the graphs' layout."""
    rng = np.random.default_rng(seed)
    frame = rng.uniform(0, 255, (batch, 3, spec.frame_size, spec.frame_size)).astype(np.float32)
    spectrogram = (rng.standard_normal((batch, 1, spec.n_freq, spec.n_time)) * 4 - 8).astype(np.float32)
    return frame, spectrogram


def accuracy_drops(root: Path) -> dict:
    """The export report's audio-visual test accuracy and drop against fp32 per precision (empty without a report)."""
    path = root / "report.json"
    if not path.is_file():
        return {}
    acc = json.loads(path.read_text()).get("accuracy", {})
    test, drops = acc.get("test", {}), acc.get("drop_vs_fp32", {})
    return {p: {"audio_visual": a["audio_visual"], "drop": drops.get(p, {}).get("audio_visual", 0.0)}
            for p, a in test.items()}


def measure(root: Path, manifest: mf.Manifest, backend: str, precision: str, mode: str | None, batch: int, a: dict,
            bar) -> dict:
    """One configuration's row: latencies, statistics, GPU split where it applies; torch backends also the
    seconds to the first output (load, CUDA graph capture, compilation) and, on CUDA, the peak GPU memory."""
    frame, spectrogram = inputs(manifest.spec, batch)
    feeds = {mf.FRAME: frame, mf.SPECTROGRAM: spectrogram}
    if backend in TORCH_BACKENDS and precision not in TORCH_PRECISIONS:
        raise BackendUnavailable(f"{backend}: runs {TORCH_PRECISIONS}, not {precision}")
    cuda = backend == "torch-cuda" and _torch_cuda()
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with open_model(root, backend, precision, threads=a["threads"], mode=mode) as model:
        if model.tokens is not None:
            feeds[mf.TOKENS] = model.tokens
        model.runner.run(feeds)
        setup_s = time.perf_counter() - started
        graph = backend not in ("ort-cpu", "torch-cpu") and getattr(model.runner, "mode", "graph").endswith("graph")
        row = timed_row(model.runner.run, model.runner.split_times if graph else None, feeds, backend, precision,
                        batch, a, bar)
    if backend in TORCH_BACKENDS:
        row.update(mode=mode, setup_s=setup_s)
    if cuda:
        row["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if backend == "ort-cpu" and a["profile"]:  # after the timed calls, which the profiler would slow
        row["profile"] = bench.op_profile(root / manifest.artefact("onnx", precision).path, feeds, a["profile"],
                                          a["threads"], a["peaks"])
    return row


def preset_precisions(a: dict) -> tuple[str, ...]:
    """The graph precisions ``--preset`` exports: fp32 (the FLOP count reads it) and those the graph backends run."""
    graphs = {p for b, p, _, _ in configurations(a) if b not in TORCH_BACKENDS and p in mf.PRECISIONS}
    return tuple(p for p in mf.PRECISIONS if p == "fp32" or p in graphs)


def _torch_cuda() -> bool:
    """torch is importable and sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def timed_row(run, split, feeds: dict, backend: str, precision: str, batch: int, a: dict, bar) -> dict:
    ms = bench.time_calls(lambda: run(feeds), a["iterations"], a["warmup"], progress=bar.update)
    row = {"backend": backend, "precision": precision, "batch": batch, **bench.latency_stats(ms),
           "samples_per_s": float(batch * 1e3 / ms.mean()), "latencies_ms": [round(float(x), 4) for x in ms]}
    if split is not None:
        parts = [split(feeds) for _ in range(min(a["iterations"], 50))]
        row["gpu_split_ms"] = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return row


def run_bench(root: Path, a: dict) -> dict:
    """Every backend x precision x batch of ``a`` on the export at ``root``; the result dict."""
    manifest = mf.Manifest.load(root)
    env = bench.environment(a["threads"])
    tokens = manifest.n_classes() if manifest.tokens_as_input else None
    fp32 = root / manifest.artefact("onnx", "fp32").path
    try:
        flops = {b: sum(bench.graph_flops(fp32, b, tokens).values()) for b in a["batch"]}
        flops_error = None
    except ValueError as e:  # ONNX shape inference cannot size every node of some tokens-as-input graphs
        flops, flops_error = {}, str(e)
    peaks = a["peaks"] = {kind: bench.gemm_peak(kind, a["threads"]) for kind in ("fp32", "int8")}
    configs = configurations(a)
    gpu_peaks: dict[str, float] = {}
    rows, skipped = [], []
    with click.progressbar(length=len(configs) * a["iterations"], label="cign-bench", file=None) as bar:
        for backend, precision, mode, batch in configs:
            try:
                row = measure(root, manifest, backend, precision, mode, batch, a, bar)
            except Exception as e:  # one configuration that cannot run or fails (a compiler, a driver) loses no other
                expected = isinstance(e, (BackendUnavailable, ValueError, KeyError))
                skipped.append({"backend": backend, "precision": precision, "mode": mode, "batch": batch,
                                "reason": str(e) if expected else f"failed: {type(e).__name__}: {str(e)[:2000]}"})
                bar.update(a["iterations"])
                continue
            if backend in ("torch-cpu", "ort-cpu"):
                peak_gflops = peaks["int8" if precision.startswith("int8") else "fp32"]
            elif backend == "torch-cuda":
                if precision not in gpu_peaks:
                    from cign_export.torch_backend import gpu_peak_tflops

                    gpu_peaks[precision] = gpu_peak_tflops(precision)
                peak_gflops = gpu_peaks[precision] * 1e3
            else:
                peak_gflops = None
            if peak_gflops and flops:
                row["floor_ms"] = flops[batch] / (peak_gflops * 1e9) * 1e3
                row["vs_floor"] = row["median_ms"] / row["floor_ms"]
            rows.append(row)
    eager = {r["batch"]: r["median_ms"] for r in rows
             if (r["backend"], r["precision"], r.get("mode")) == ("torch-cpu", "fp32", "eager")}
    for r in rows:
        if r["batch"] in eager:
            r["vs_eager"] = r["median_ms"] / eager[r["batch"]]
    return {"model": str(root), "classes": manifest.n_classes(), "spec": manifest.spec.name, "environment": env,
            "flops": flops, "flops_error": flops_error, "gemm_peak_gflops": peaks, "gpu_peak_tflops": gpu_peaks, "iterations": a["iterations"],
            "warmup": a["warmup"],
            "accuracy": accuracy_drops(root), "rows": rows, "skipped": skipped}


def table(result: dict) -> str:
    """The result as a markdown table (latencies in ms)."""
    env = result["environment"]
    lines = [f"CPU: {bench.cpu_label(env)}, {env['threads'] or 'default'} threads"
             + (f"; GPU: {env['gpu']['name']} (driver {env['gpu']['driver']})" if env["gpu"] else ""),
             f"model: {result['model']} (spec {result['spec']}, K {result['classes']}); GFLOP per sample "
             + (f"{result['flops'][min(result['flops'])] / min(result['flops']) / 1e9:.2f}" if result["flops"] else
                f"unknown, so no floor ({result['flops_error']})") + "; peak fp32 "
             f"{result['gemm_peak_gflops']['fp32']:.0f} GFLOP/s, int8 {result['gemm_peak_gflops']['int8']:.0f} GOP/s", "",
             "| backend | precision | batch | median | mean | p90 | p95 | p99 | min | max | samples/s | vs eager | floor | vs floor | H2D / compute / D2H | first output s | GPU MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if result.get("gpu_peak_tflops"):
        lines.insert(2, "GPU dense matrix-product rate measured: " + ", ".join(
            f"{p} {v:.0f} TFLOP/s" for p, v in result["gpu_peak_tflops"].items()))
    for r in result["rows"]:
        split = r.get("gpu_split_ms")
        cells = [label(r), r["precision"], r["batch"]]
        cells += [ms(r[k]) for k in ("median_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms")]
        cells += [f"{r['samples_per_s']:.1f}", f"{r['vs_eager']:.2f}x" if "vs_eager" in r else "-"]
        cells += [ms(r["floor_ms"]), f"{r['vs_floor']:.2f}x"] if "floor_ms" in r else ["-", "-"]
        cells.append(" / ".join(f"{split[k]:.3f}" for k in ("h2d_ms", "compute_ms", "d2h_ms")) if split else "-")
        cells.append(f"{r['setup_s']:.1f}" if "setup_s" in r else "-")
        cells.append(f"{r['gpu_memory_peak_mib']:.0f}" if "gpu_memory_peak_mib" in r else "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- {label(s)} {s['precision']} batch {s['batch']}: {s['reason']}"
                                     for s in result["skipped"]]
    if result["accuracy"]:
        lines.append("\naudio-visual test accuracy from the export's report: " + ", ".join(
            f"{p} {v['audio_visual']:.1f} % ({v['drop']:+.1f})" for p, v in result["accuracy"].items()))
    for r in result["rows"]:
        if "profile" in r:
            lines += ["", profile_table(r)]
    return "\n".join(lines) + "\n"


def label(row: dict) -> str:
    """The backend, with the mode for the torch backends."""
    return f"{row['backend']} {row['mode']}" if row.get("mode") else row["backend"]


def ms(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def profile_table(row: dict, ops: int = 12) -> str:
    """Where one call of a configuration goes (``--profile``): parts, then the costliest op types."""
    p = row["profile"]

    def cells(name: str, x: dict) -> str:
        rate = (f"{x['gflop']:.2f} | {x['gops']:.0f} | {100 * x['of_peak']:.0f} % | {x['floor_ms']:.2f}"
                if x["gflop"] else "- | - | - | -")
        return f"| {name} | {x['nodes']} | {x['ms']:.2f} | {100 * x['share']:.1f} % | {rate} |"

    lines = [f"{row['backend']} {row['precision']} batch {row['batch']}: onnxruntime profile, median of {p['calls']} "
             f"calls, kernels {p['kernel_ms']:.2f} ms per call", "",
             "| part / op | nodes | ms | share | GFLOP | GOP/s | of peak | floor ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [cells(f"**{k}**", v) for k, v in p["by_part"].items() if v["nodes"]]
    lines += [cells(k, v) for k, v in list(p["by_op"].items())[:ops]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Latency distribution per configuration (box plot, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.boxplot([r["latencies_ms"] for r in rows], whis=(1, 99), showfliers=True)
    ax.set_xticks(range(1, len(rows) + 1), [f"{label(r)}\n{r['precision']}\nb{r['batch']}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title(f"{Path(result['model']).name}: {bench.cpu_label(result['environment'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_bench(device_name: str, steps: int, data_dir: Path, workers: int) -> dict:
    """Training step rate of both presets (fp32 and ``--amp auto``) and the loader rate of their avdigits stores."""
    try:
        import torch
    except ImportError as e:
        raise click.ClickException(f"--train needs torch: {e}; pip install 'cign-edge[train]'") from e
    from cign_train.data.ingest import store_dir
    from cign_train.data.store import PreparedStore
    from cign_train.precision import autocast_dtype
    from cign_train.settings import PRESETS
    from cign_train.throughput import loader_rate, step_rate

    device = torch.device(device_name)
    amp = autocast_dtype("auto", device)
    rows, skipped = [], []
    for preset in ("cpu", "paper"):
        batch = PRESETS[preset]["batch_size"] if device.type == "cuda" or preset == "cpu" else 8
        for dtype in dict.fromkeys([None, amp]):
            rows.append({"what": "train step", "preset": preset, "batch": batch,
                         "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
                         "samples_per_s": step_rate(preset, batch, steps, device, dtype)})
        root = store_dir(data_dir, "avdigits", PRESETS[preset]["spec"])
        if not (root / "index.json").is_file():
            skipped.append({"what": "loader", "preset": preset, "reason": f"no prepared store at {root} "
                            f"(cign-prepare --dataset avdigits --preset {PRESETS[preset]['spec']})"})
            continue
        store = PreparedStore(root)
        rows.append({"what": f"loader, {workers} workers", "preset": preset, "batch": batch, "precision": "-",
                     "samples_per_s": loader_rate(store, batch, workers)})
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(), "environment": bench.environment(torch.get_num_threads()),
            "steps": steps, "rows": rows, "skipped": skipped}


def train_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"training on {result['device']}; CPU: {bench.cpu_label(env)}, {result['torch_threads']} torch threads", "",
             "| measure | preset | batch | precision | samples/s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['what']} | {r['preset']} | {r['batch']} | {r['precision']} | {r['samples_per_s']:.1f} |"
              for r in result["rows"]]
    for preset in ("cpu", "paper"):
        steps = [r["samples_per_s"] for r in result["rows"] if r["preset"] == preset and r["what"] == "train step"]
        loader = [r["samples_per_s"] for r in result["rows"] if r["preset"] == preset and r["what"].startswith("loader")]
        if steps and loader:
            verdict = "keeps up" if loader[0] >= max(steps) else "starves the step"
            lines.append(f"\n{preset}: the loader delivers {loader[0] / max(steps):.1f}x the fastest step's rate ({verdict})")
    lines += [f"\nskipped {s['what']} ({s['preset']}): {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _csv(choices, base: bool = False):
    """A comma-separated list of ``choices`` (``base``: each item ``CHOICE[:ARGUMENT]``); None: any."""
    def parse(ctx, param, value):
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if choices and (v.split(":")[0] if base else v) not in choices]
        if bad:
            raise click.BadParameter(f"{bad} not among {list(choices)}")
        return items
    return parse


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An export folder (cign-export).")
@click.option("--preset", type=click.Choice(["cpu", "paper"]), help="Bench a random-weight model at a preset's shapes instead.")
@click.option("--classes", type=click.IntRange(min=1), help="--preset: K [default: 10 cpu, 100 paper].")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="--preset: where the avdigits store for INT8 calibration is (prepared when missing).")
@click.option("--backends", default=",".join(BENCH_BACKENDS), show_default=True, callback=_csv(BENCH_BACKENDS))
@click.option("--precision", default="fp32,fp16,int8", show_default=True, callback=_csv(BENCH_PRECISIONS))
@click.option("--torch-modes", default="eager,graph", show_default=True, callback=_csv(TORCH_MODES, base=True),
              help="torch backends: execution modes, each of " + ", ".join(TORCH_MODES) + " (compile modes as "
                   "compile:MODE with a torch.compile mode; graph modes need torch-cuda).")
@click.option("--batch", default="1,8", show_default=True, callback=_csv(None))
@click.option("--iterations", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (onnxruntime intra-op, torch) [default: the libraries'].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench"), show_default=True,
              help="Folder for bench.json, bench.md and bench.png (train.json and train.md with --train).")
@click.option("--profile", type=click.IntRange(min=0), default=0, show_default=True,
              help="ort-cpu: also profile N calls per configuration with onnxruntime's profiler (time per op, FLOPs, "
                   "rate against the peak).")
@click.option("--cpu-isa", type=click.Choice(isa.ISAS), default="native", show_default=True,
              help="Run with this instruction set: avx2 masks AVX-512 / VNNI / AMX (cign_runtime.isa).")
@click.option("--train", is_flag=True, help="Instead: training throughput of both presets and the loader's rate beside it.")
@click.option("--device", default="cpu", show_default=True, help="--train: torch device (cpu, cuda).")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="--train: timed steps per case.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="--train: loader processes.")
def main(model_dir, preset, classes, data_dir, backends, precision, torch_modes, batch, iterations, warmup, threads, out,
         profile, cpu_isa, train, device, steps, workers):
    """Latency of an exported CIGN on each backend / precision / batch, with the FLOPs floor of this machine."""
    if cpu_isa != isa.current():  # start over in a process that runs with that instruction set
        try:
            env = isa.environ(cpu_isa)
        except RuntimeError as e:
            raise click.UsageError(f"--cpu-isa {cpu_isa}: {e}") from e
        os.execve(sys.executable, [sys.executable, "-m", "cign_export.bench_cli", *sys.argv[1:]], env)
    if sum(x is not None and x is not False for x in (model_dir, preset, train)) != 1:
        raise click.UsageError("give one of --model EXPORT_DIR, --preset cpu|paper or --train")
    out.mkdir(parents=True, exist_ok=True)
    if train:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        result = train_bench(device, steps, data_dir, workers)
        (out / "train.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "train.md").write_text(train_table(result))
        click.echo(train_table(result))
        return
    try:
        batches = sorted({int(b) for b in batch})
    except ValueError as e:
        raise click.BadParameter(f"--batch takes integers: {batch}") from e
    a = {"backends": backends, "precision": precision, "torch_modes": torch_modes, "batch": batches,
         "iterations": iterations, "warmup": warmup, "threads": threads, "profile": profile}
    with tempfile.TemporaryDirectory() as tmp:
        if preset is not None:
            try:
                from cign_export.preset import export_preset
            except ImportError as e:
                raise click.ClickException(f"--preset builds the model with torch: {e}; pip install 'cign-edge[train]'")
            model_dir = Path(tmp) / f"{preset}-random"
            export_preset(preset, model_dir, classes, preset_precisions(a), data_dir=data_dir)
        try:
            result = run_bench(model_dir, a)
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        result["preset"] = preset
        (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "bench.md").write_text(table(result))
        if result["rows"]:
            plot(result, out / "bench.png")
    click.echo(table(result))
    click.echo(f"wrote {out / 'bench.json'}, bench.md, bench.png")


if __name__ == "__main__":
    main()
