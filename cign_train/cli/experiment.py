"""``cign-experiment``: one of the paper's tables or figures, over seeds, on a prepared data set."""
from __future__ import annotations

from pathlib import Path

import click
import torch
from tqdm import tqdm

from cign_runtime.bench import cpu_label, environment
from cign_train.data.definitions import DATASETS
from cign_train.experiments import EXPERIMENTS, Sweep, collect, run_experiment, write_results
from cign_train.precision import AMP_CHOICES
from cign_train.settings import PRESETS


def describe() -> str:
    return "\b\n" + "\n".join(f"  {e.name:<9} {e.title}: " + ", ".join(r.key for r in e.rows) for e in EXPERIMENTS.values())


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="Experiments and their rows:\n\n" + describe())
@click.argument("experiment", type=click.Choice(list(EXPERIMENTS)))
@click.option("--dataset", type=click.Choice(DATASETS), default="avdigits", show_default=True)
@click.option("--name", help="csv: the prepared store's folder name under --data-dir.")
@click.option("--data-dir", default="data", show_default=True)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu", show_default=True,
              help="Training preset every row starts from.")
@click.option("--tasks", type=click.IntRange(min=1), help="csv: the store's classes split into N equal tasks (rows "
              "that set their own task count keep it) [default: the data set's].")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--rows", help="Comma-separated row keys to train (default: all); the tables take every finished row.")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/experiments"),
              show_default=True, help="Run folders: RUNS/STORE-PRESET/RUN-seedS, shared by experiments.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where experiment_NAME_STORE.{json,md,png} are written.")
@click.option("--no-train", is_flag=True, help="Only tabulate the runs that are finished.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--amp", type=click.Choice(AMP_CHOICES), default="auto", show_default=True)
@click.option("--workers", type=int, help="Loader processes [default: the preset's].")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (two sweeps at --threads 1 on 2 cores).")
def main(experiment, dataset, name, data_dir, preset, tasks, seeds, rows, runs, out, no_train, device, amp, workers, threads):
    """Run EXPERIMENT's rows for every seed (finished runs are re-read, interrupted ones resumed), then
    write its tables (paper layout, mean ± std; test reported, val chosen on) and figure."""
    if threads:
        torch.set_num_threads(threads)
    if dataset == "csv" and not (name and tasks):
        raise click.UsageError("--dataset csv needs --name (the store cign-prepare wrote) and --tasks N")
    exp = EXPERIMENTS[experiment]
    keys = [k for k in rows.split(",") if k] if rows else None
    unknown = set(keys or ()) - {r.key for r in exp.rows}
    if unknown:
        raise click.BadParameter(f"{sorted(unknown)} are not rows of {experiment} ({[r.key for r in exp.rows]})",
                                 param_hint="--rows")
    operational = {k: v for k, v in {"device": device, "amp": amp, "workers": workers}.items() if v is not None}
    sweep = Sweep(dataset, name, data_dir, preset, [int(s) for s in seeds.split(",")], runs, operational, tasks)
    run_experiment(exp, sweep, keys, train_missing=not no_train, log=tqdm.write)
    table = collect(exp, sweep)
    if not table:
        raise click.ClickException(f"{experiment}: no finished run under {runs} to tabulate")
    machine = environment() | {"torch_threads": torch.get_num_threads()}
    for path in write_results(exp, sweep, table, out, machine, cpu_label(machine)):
        click.echo(f"wrote {path}")
    click.echo((out / f"experiment_{experiment}_{name or dataset}.md").read_text().split("\n### val")[0])


if __name__ == "__main__":
    main()
