"""The deployment latency targets from ``cign-bench`` runs on this machine: paper preset (K 100, random weights),
cpu preset (K 10) and, when present, a trained avdigits export (its report gives the INT8 accuracy drop).

Each model is one ``cign-bench`` process (torch-cpu eager + onnxruntime CPU, fp32 / fp16 / int8, batch 1
and 8, ``--threads`` as given), so every ratio below is from one run. Copies each run's JSON and
plot to ``benchmarks/results/latency_<name>[_avx2][_TAG].{json,png}`` (``--tag``: what tells a second
CPU's results apart, e.g. ``--tag avx512`` for a CPU with AVX-512 VNNI but no AMX) and prints, per model, batch 1:
onnxruntime fp32 / eager, fp32 / floor, INT8 / eager, INT8 / fp32 and the INT8 audio-visual accuracy
drop, beside the targets (fp32 <= 0.5x eager and <= 1.1x floor; INT8 <= 0.2x eager with
VNNI, <= 0.6x fp32 on AVX2-only CPUs; drop <= 1 point).

``--cpu-isa avx2`` runs everything with the AVX2-only instruction set (``cign_runtime.isa``), the
accuracy drop included: the trained export's graphs are re-scored on its test split in a process
with the same instruction set, because INT8 numerics differ between kernels (``calibration.quantize``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from cign_runtime import bench, isa

RESULTS = Path(__file__).parent / "results"


def run(name: str, args: list[str], a: argparse.Namespace, iterations: int) -> dict:
    out = a.work / f"{name}{a.suffix}"
    cmd = [sys.executable, "-m", "cign_export.bench_cli", *args, "--backends", "torch-cpu,ort-cpu", "--torch-modes",
           "eager", "--precision", "fp32,fp16,int8", "--batch", "1,8", "--iterations", str(iterations), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--out", str(out), "--data-dir", str(a.data_dir), "--cpu-isa", a.cpu_isa,
           "--profile", str(a.profile)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "bench.json").read_text())
    if name == "avdigits":  # the drop on this instruction set's kernels, not the exporting machine's
        scored = subprocess.run([sys.executable, __file__, "--score", str(a.export), "--threads", str(a.threads)],
                                check=True, capture_output=True, text=True, env=isa.environ(a.cpu_isa))
        result["accuracy_here"] = json.loads(scored.stdout.strip().splitlines()[-1])
        (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copy(out / "bench.json", RESULTS / f"latency_{name}{a.suffix}.json")
    shutil.copy(out / "bench.png", RESULTS / f"latency_{name}{a.suffix}.png")
    return result


def score(export: Path, threads: int) -> dict:
    """Audio-visual top-1 (%) of each ONNX graph of ``export`` on its run's test split, in this process,
    and each precision's drop against fp32."""
    import onnxruntime as ort

    from cign_export.parity import accuracy, load_samples, run_session
    from cign_runtime import manifest as mf
    from cign_train.data.store import PreparedStore

    manifest = mf.Manifest.load(export)
    report = json.loads((export / "report.json").read_text())
    samples = load_samples(PreparedStore(report["samples"]["store"]), manifest.classes, "test")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    acc = {}
    for artefact in manifest.artefacts:
        if artefact.role == "onnx":
            session = ort.InferenceSession(str(export / artefact.path), options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=list(mf.DISABLED_OPTIMIZERS.get(artefact.precision, ())))
            acc[artefact.precision] = accuracy(run_session(session, samples.feeds), samples.labels)["audio_visual"]
    return {p: {"audio_visual": v, "drop": acc["fp32"] - v} for p, v in acc.items()} | {"cpu_isa": isa.current()}


def summary(name: str, r: dict) -> str:
    rows = {(x["backend"], x["precision"]): x for x in r["rows"] if x["batch"] == 1}
    eager, fp32, int8 = rows[("torch-cpu", "fp32")], rows[("ort-cpu", "fp32")], rows[("ort-cpu", "int8-cpu")]
    drop = r.get("accuracy_here", r["accuracy"]).get("int8-cpu", {}).get("drop")
    return (f"| {name} | {r['flops']['1'] / 1e9:.2f} | {eager['median_ms']:.1f} | {fp32['median_ms']:.1f} | "
            f"{fp32['median_ms'] / eager['median_ms']:.2f}x | {fp32['vs_floor']:.2f}x | {int8['median_ms']:.1f} | "
            f"{int8['median_ms'] / eager['median_ms']:.2f}x | {int8['median_ms'] / fp32['median_ms']:.2f}x | "
            f"{int8['vs_floor']:.2f}x | {'-' if drop is None else f'{drop:+.1f}'} |")


def accounting(name: str, row: dict) -> str:
    p = row["profile"]
    conv, matmul, other = (p["by_part"][k] for k in ("conv", "matmul", "other"))
    return (f"| {name} | {row['precision']} | {p['kernel_ms']:.1f} | {conv['ms']:.1f} ({100 * conv['of_peak']:.0f} %) | "
            f"{matmul['ms']:.1f} ({100 * matmul['of_peak']:.0f} %) | {other['ms']:.1f} ({100 * other['share']:.0f} %) | "
            f"{conv['floor_ms'] + matmul['floor_ms']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, default=Path("exports/bench-native-task4"),
                    help="a trained avdigits export with fp16 and int8-cpu (cign-export --fp16 --int8 --target cpu)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-latency"))
    ap.add_argument("--iterations", type=int, default=200, help="timed calls per configuration (paper preset: a quarter)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=int, default=20, help="onnxruntime-profiled calls per configuration")
    ap.add_argument("--cpu-isa", choices=isa.ISAS, default="native", help="instruction set (cign_runtime.isa)")
    ap.add_argument("--tag", default="", help="appended to the results' names, e.g. avx512 (another CPU's results beside these)")
    ap.add_argument("--score", type=Path, help="internal: print the test accuracy of this export's graphs as JSON")
    a = ap.parse_args()
    if a.score:
        print(json.dumps(score(a.score, a.threads)))
        return
    a.suffix = ("" if a.cpu_isa == "native" else f"_{a.cpu_isa}") + (f"_{a.tag}" if a.tag else "")
    RESULTS.mkdir(exist_ok=True)
    results = {"paper": run("paper", ["--preset", "paper"], a, max(50, a.iterations // 4)),
               "cpu": run("cpu", ["--preset", "cpu"], a, a.iterations)}
    if (a.export / "manifest.json").is_file():
        results["avdigits"] = run("avdigits", ["--model", str(a.export)], a, a.iterations)
    env = results["paper"]["environment"]
    print(f"CPU: {bench.cpu_label(env)}, {a.threads} threads; batch 1, medians")
    print("| model | GFLOP | eager ms | ort fp32 ms | fp32 / eager | fp32 / floor | int8 ms | int8 / eager | "
          "int8 / fp32 | int8 / int8 floor | int8 AV drop |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(summary(name, r))
    print("\nWhere a batch-1 call goes (onnxruntime's profiler; ms per call, rate against the peak of its arithmetic)")
    print("| model | graph | kernels ms | conv ms (of peak) | matmul ms (of peak) | other ops ms (share) | "
          "conv + matmul at peak ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        for row in r["rows"]:
            if row["batch"] == 1 and "profile" in row and row["precision"] in ("fp32", "int8-cpu"):
                print(accounting(name, row))


if __name__ == "__main__":
    main()
