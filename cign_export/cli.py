"""``cign-export``: a trained run's task model -> ONNX (fp32 / fp16 / INT8), TensorRT engines, manifest."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cign_export.exporter import ExportError, Exporter, ExportOptions, ExportResult
from cign_export.onnx_format import DEFAULT_OPSET, OPSETS
from cign_export.parity import ParityError
from cign_runtime import manifest as mf
from cign_train import checkpoint as ck

RUNS = Path("runs")
EXPORTS = Path("exports")


def newest_run(root: Path = RUNS) -> Path:
    """The run folder under ``root`` whose newest task checkpoint is the most recent."""
    runs = [(max(p.stat().st_mtime for p in d.glob("task_*.pt")), d) for d in root.glob("*") if any(d.glob("task_*.pt"))]
    if not runs:
        raise click.ClickException(f"no run with task checkpoints under {root}/: train one (cign-train) or pass --run")
    return max(runs)[1]


def finished_tasks(run: Path) -> list[int]:
    last = ck.last_finished_task(run)
    if last < 0:
        raise click.ClickException(f"{run}: no task checkpoint (task_0.pt, ...) in this folder")
    return list(range(last + 1))


def summary(result: ExportResult) -> str:
    r = result.report
    lines = [f"exported task {r['task']} of {r['run']} -> {result.out_dir}/"]
    fp32 = r["parity"]["fp32_vs_eager"]
    lines.append("parity fp32 onnxruntime vs PyTorch eager ({} test clips): max |diff| {}".format(
        r["samples"]["test"], ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in fp32.items())))
    lines.append(f"{'precision':<10} {'audio':>7} {'visual':>7} {'a-v':>7}  drop vs fp32 (a-v)  top-1 agreement (a-v)")
    for p, acc in r["accuracy"]["test"].items():
        drop = r["accuracy"]["drop_vs_fp32"].get(p, {}).get("audio_visual")
        agree = r["parity"].get(f"{p}_vs_fp32", {}).get("p_av", {}).get("top1_agreement")
        lines.append(f"{p:<10} {acc['audio']:>7.1f} {acc['visual']:>7.1f} {acc['audio_visual']:>7.1f}  "
                     f"{'' if drop is None else f'{drop:+.1f}':>18}  {'' if agree is None else f'{100 * agree:.1f}%':>21}")
    c = r["confidence"]
    lines.append(f"confidence (fitted on val): temperature {c['temperature']:.3f}, threshold {c['threshold']:.3f}, "
                 f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}")
    lines.append(f"trtexec lines: {result.out_dir / 'trtexec.sh'}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run folder of cign-train [default: the newest under ./runs].")
@click.option("--task", type=click.IntRange(min=0), help="Task to export, as in task_T.pt (0-based) [default: the last finished].")
@click.option("--all-tasks", is_flag=True, help="Export every finished task, each into its own folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder [default: exports/RUN-taskT, with -tokens for --tokens-as-input].")
@click.option("--fp16", is_flag=True, help="Also an FP16 ONNX (fp32 inputs and outputs).")
@click.option("--int8", is_flag=True, help="Also an INT8 ONNX calibrated on the train split; needs --target.")
@click.option("--target", type=click.Choice(["trt", "cpu"]), help="INT8 recipe: trt (symmetric Q/DQ, zero points 0) or cpu (onnxruntime's fastest).")
@click.option("--tokens-as-input", is_flag=True, help="One graph for every task: the class-token table is an input; tables saved as tokens_taskT.npy.")
@click.option("--trt", is_flag=True, help="Build TensorRT engines (needs tensorrt and a GPU; trtexec.sh is always written).")
@click.option("--opset", type=click.IntRange(*OPSETS), default=DEFAULT_OPSET, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=mf.DEFAULT_MAX_BATCH, show_default=True, help="Largest batch of the TensorRT profile.")
@click.option("--calibration-per-class", type=click.IntRange(min=1), default=10, show_default=True, help="INT8 calibration clips per seen class.")
@click.option("--parity-samples", type=click.IntRange(min=1), help="Test clips used for parity and accuracy [default: all].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the run's prepared store is [default: the run's].")
@click.option("--exemplars-per-class", type=click.IntRange(min=1), default=ExportOptions.exemplars_per_class,
              show_default=True, help="--tokens-as-input: val clips per class kept as encoder features (float16), "
                                      "cign-enroll's negatives.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(run, task, all_tasks, out, fp16, int8, target, tokens_as_input, trt, opset, max_batch, calibration_per_class,
         parity_samples, data_dir, exemplars_per_class, seed):
    """Export a task's model to ONNX (and TensorRT) with its manifest, checking parity on the test split."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("cign_export")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # once: a library's root handler (basicConfig in the quantization tools) would repeat each line
    if int8 and target is None:
        raise click.UsageError("--int8 needs --target trt or --target cpu")
    if target is not None and not int8:
        raise click.UsageError("--target applies to --int8 only; add --int8 or drop --target")
    if all_tasks and task is not None:
        raise click.UsageError("--task and --all-tasks contradict each other: give one")
    if all_tasks and out is not None:
        raise click.UsageError("--out names one folder; --all-tasks writes one per task under exports/")
    run = run or newest_run()
    done = finished_tasks(run)
    if task is not None and task not in done:
        raise click.UsageError(f"{run} has no task {task}: finished tasks are {done} (task_0.pt ... task_{done[-1]}.pt)")
    tasks = done if all_tasks else [done[-1] if task is None else task]
    precisions = ("fp32",) + (("fp16",) if fp16 else ()) + ((f"int8-{target}",) if int8 else ())
    options = ExportOptions(precisions, tokens_as_input, trt, opset, max_batch, calibration_per_class, parity_samples,
                            seed, None if data_dir is None else str(data_dir), exemplars_per_class)
    failed = []
    for t in tasks:
        folder = out or EXPORTS / f"{run.name}-task{t}{'-tokens' if tokens_as_input else ''}"
        try:
            result = Exporter(run, t, folder, options)()
        except (ExportError, ParityError, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(summary(result))
        if result.engine_error:
            failed.append(result.engine_error)
    if failed:
        click.echo(f"Error: --trt: {failed[0]}\nThe ONNX files, manifest and trtexec.sh were written.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
