"""``cign-train``: the class-incremental CIGN procedure on a prepared store."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from cign_train.config import CTL_DENOMINATORS, CTL_NEGATIVES, TEACHER_BN, TOKEN_SOURCES
from cign_train.buffer import SELECTIONS
from cign_train.data.definitions import DATASETS, get_definition
from cign_train.data.ingest import ensure_avdigits, store_dir
from cign_train.methods import Option, available, get_method
from cign_train.precision import AMP_CHOICES
from cign_train.reporting import results_table
from cign_train.schedule import LR_SCHEDULES
from cign_train.settings import EVAL_SPLITS, PRESETS, REHEARSAL_SAMPLING, TrainSettings, preset_settings
from cign_train.trainer import NonFiniteLoss, Trainer

#: Options that do not change a run's results: a resume may give them other values.
OPERATIONAL_OPTIONS = {"threads", "workers", "out", "resume", "reuse", "no_progress", "stop_after"}
#: Options that set a field of the model config.
MODEL_OPTIONS = {"dim", "depth", "heads", "visual_stride", "assign", "ctl_denominator", "ctl_negatives", "token_source", "teacher_bn",
                 "tau", "kl_temperature"}
#: Options of the rehearsal buffer: only for methods that keep one (NEEDS_BUFFER).
BUFFER_OPTIONS = ("buffer_per_class", "buffer_select", "rehearsal_sampling")


def method_defaults(setting: str) -> str:
    """The default of a run setting, then each method's own (``Method.SETTINGS``), for help texts."""
    own = [f"{name}: {get_method(name).SETTINGS[setting]}" for name in available() if setting in get_method(name).SETTINGS]
    return "; ".join([str(getattr(TrainSettings, setting)), *own])


def method_option(option: Option) -> click.Option:
    """The click option of a method's ``Option`` (flagged ``method_option`` for the command to find)."""
    flag = "--" + option.name.replace("_", "-")
    default_text = f"[{option.default}]"
    if isinstance(option.default, bool):
        opt = click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=f"{option.help} {default_text}")
    else:
        kind = click.Choice(option.choices) if option.choices else type(option.default)
        opt = click.Option([flag], type=kind, help=f"{option.help} {default_text}")
    opt.method_option = True
    return opt


class MethodCommand(click.Command):
    """``cign-train`` with the chosen ``--method``'s own options added (``--method NAME --help`` lists them)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        name = "cign"
        for i, arg in enumerate(args):
            if arg == "--method" and i + 1 < len(args):
                name = args[i + 1]
            elif arg.startswith("--method="):
                name = arg.split("=", 1)[1]
        base = [p for p in self.params if not getattr(p, "method_option", False)]
        extra = [method_option(o) for o in get_method(name).OPTIONS] if name in available() else []
        taken = {p.name for p in base} & {p.name for p in extra}
        if taken:
            raise click.UsageError(f"method {name!r} declares options that cign-train already has: {sorted(taken)}")
        self.params = base + extra
        return super().parse_args(ctx, args)


def refuse_inapplicable(ctx: click.Context, method: str) -> None:
    """A click error for an option given on the command line that the chosen method does not read."""
    cls = get_method(method)
    cign_only = set(get_method("cign").LOSS_OPTIONS) - set(cls.LOSS_OPTIONS)
    not_applicable = cign_only | (set() if cls.NEEDS_BUFFER else set(BUFFER_OPTIONS))
    for param in ctx.command.params:
        if param.name in not_applicable and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            why = "keeps no rehearsal buffer" if param.name in BUFFER_OPTIONS else "does not use it"
            raise click.UsageError(f"{param.opts[0]} does not apply to --method {method}: it {why}")


def encoder_rates(params: dict) -> dict[str, float | None]:
    """{audio_encoder_lr, visual_encoder_lr} from the command line: each encoder's own option, else --encoder-lr."""
    return {f"{m}_encoder_lr": params["encoder_lr"] if params[f"{m}_encoder_lr"] is None else params[f"{m}_encoder_lr"]
            for m in ("audio", "visual")}


def as_setting(name: str, value, saved: TrainSettings, params: dict) -> tuple[str, object, object]:
    """(setting, its saved value, the value option ``name`` = ``value`` gives it), for comparing; ``params``
    are all the command line's options (``--encoder-lr`` sets only the encoders without their own option)."""
    if name == "preset":  # a preset reads the prepared store of its own spec
        return "spec", saved.spec, PRESETS[value]["spec"]
    if name in MODEL_OPTIONS:
        return f"model.{name}", getattr(saved.model, name), value
    if name in saved_method_options(saved):
        return f"method_options.{name}", saved_method_options(saved)[name], value
    if name in ("no_avctd", "no_avcg"):
        field = "use_" + name[3:]
        return f"model.{field}", getattr(saved.model, field), not value
    if name == "encoder_lr":  # both encoders' rates, but one given its own option
        return ("audio_encoder_lr, visual_encoder_lr", (saved.audio_encoder_lr, saved.visual_encoder_lr),
                tuple(encoder_rates(params).values()))
    if name == "tasks":  # None in config.json: the data set's default number
        return name, saved.tasks or get_definition(saved.dataset).tasks, value
    if name in ("data_dir", "encoder_weights"):
        return name, None if getattr(saved, name) is None else Path(getattr(saved, name)), Path(value)
    return name, getattr(saved, name), value


def saved_method_options(saved: TrainSettings) -> dict:
    """The saved run's method options, its method's defaults filled in."""
    return get_method(saved.method).resolve_options(saved.method_options)


def resume_settings(ctx: click.Context, out: Path) -> TrainSettings:
    """The settings of the run in ``out`` (its ``config.json``); a click error names any option given on
    the command line that contradicts them. Options in :data:`OPERATIONAL_OPTIONS` may differ."""
    config_path = out / "config.json"
    if not config_path.is_file():
        raise click.ClickException(f"{config_path}: nothing to resume in {out}")
    try:
        saved = TrainSettings.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as e:
        raise click.ClickException(f"{config_path}: {e}") from e
    for param in ctx.command.params:
        name, value = param.name, ctx.params[param.name]
        if name in OPERATIONAL_OPTIONS or ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE,
                                                                                  ParameterSource.ENVIRONMENT):
            continue
        setting, was, given = as_setting(name, value, saved, ctx.params)
        if was != given:
            flag = param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
            was, given = (str(v) if isinstance(v, Path) else repr(v) for v in (was, given))
            raise click.UsageError(
                f"{flag} contradicts the run in {out}: its {config_path.name} has {setting} = {was}, the command line "
                f"gives {given}. A resume takes the run's settings; leave {flag} out, or pick another --out.")
    workers = ctx.params["workers"]
    return saved if workers is None else dataclasses.replace(saved, workers=workers)


def csv_preset(data_dir: Path, name: str) -> str:
    """The preset of csv store ``name``'s one finished prepared store (``cign-prepare --dataset csv --name``),
    said on stdout; a click error when it has none, or several (naming them and ``--preset``)."""
    found = sorted(p.parent.name for p in (Path(data_dir) / name / "prepared").glob("*/index.json")
                   if p.parent.name in PRESETS)
    if not found:
        raise click.ClickException(f"{Path(data_dir) / name / 'prepared'}: no prepared store of {name!r}; prepare one "
                                   f"with cign-prepare --dataset csv --index FILE --name {name} [--preset cpu]")
    if len(found) > 1:
        raise click.UsageError(f"{Path(data_dir) / name} holds prepared stores of the presets {found}: choose one "
                               f"with --preset")
    click.echo(f"{name}: training with the {found[0]!r} preset, the one its prepared store "
               f"({store_dir(Path(data_dir), name, found[0])}) was prepared with")
    return found[0]


def differences(was: dict, now: dict, prefix: str = "") -> list[str]:
    """``"key: saved -> given"`` for every (nested, dotted) key whose value differs between two settings dicts."""
    out = []
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def reusable(settings: TrainSettings, out: Path) -> bool:
    """``--reuse``: True when ``out`` holds a run of these settings (to continue, or to report when it is
    finished), False when it holds none; a click error names the settings of a run there that differ."""
    config_path = out / "config.json"
    if not config_path.is_file():
        return False
    try:
        saved = TrainSettings.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as e:
        raise click.ClickException(f"{config_path}: {e}") from e
    differ = differences(saved.results_settings().to_dict(), settings.results_settings().to_dict())
    if differ:
        raise click.ClickException(
            f"{out} holds a run with other settings ({'; '.join(differ)}, saved -> given): pick another --out, "
            f"continue that run as it is with `cign-train --out {out} --resume`, or remove {out}")
    return True


@click.command(cls=MethodCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(DATASETS), default="avdigits", show_default=True)
@click.option("--name", help="csv: the store's folder name under --data-dir (cign-prepare --name; default there: the CSV's stem).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Training preset [default: the data set's: cpu for "
              "avdigits, else paper; csv: the preset its one prepared store was prepared with].")
@click.option("--method", type=click.Choice(available()), default="cign", show_default=True,
              help="Continual-learning method; `--method NAME --help` adds its own options to this list.")
@click.option("--epochs", type=int, help="Epochs per task.")
@click.option("--first-task-epochs", type=int, help="Epochs of the first task [default: --epochs if given, else the preset's (cpu 12)].")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Adam learning rate (the peak of --lr-schedule cosine).")
@click.option("--encoder-lr", type=float, help="Learning rate of the two encoders, on the same schedule, e.g. "
              "lower for pretrained ones [default: --lr].")
@click.option("--audio-encoder-lr", type=float, help="The audio encoder's learning rate [default: --encoder-lr, "
              "else --lr].")
@click.option("--visual-encoder-lr", type=float, help="The visual encoder's learning rate [default: --encoder-lr, else --lr].")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="Per-task lr schedule: constant (paper) or "
              "cosine (linear warm-up, then cosine to 0) [default: the preset's].")
@click.option("--warmup", type=float, help="cosine: fraction of each task's steps spent warming up [default: 0.1].")
@click.option("--tasks", type=int, help="Number of equal tasks [default: the data set's].")
@click.option("--class-order", type=click.Choice(["definition", "seeded"]), help="Benchmark class order or a permutation by --seed.")
@click.option("--max-per-class", type=int, help="Cap on training clips per class.")
@click.option("--buffer-per-class", type=int, help="Rehearsal exemplars per old class.")
@click.option("--buffer-select", type=click.Choice(SELECTIONS),
              help=f"How exemplars are chosen [default: {method_defaults('buffer_select')}].")
@click.option("--rehearsal-sampling", type=click.Choice(REHEARSAL_SAMPLING),
              help=f"How batches draw from task clips + buffer [default: {method_defaults('rehearsal_sampling')}].")
@click.option("--augment/--no-augment", default=None, help="Training augmentation [default: the preset's; on in cpu].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda (torchrun: one process per GPU).")
@click.option("--amp", type=click.Choice(AMP_CHOICES), help="Mixed precision: auto = bf16 on CUDA and on CPUs with native bf16.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (e.g. 1 when other jobs share the cores) [default: torch's].")
@click.option("--workers", type=int, help="Loader processes.")
@click.option("--eval-split", type=click.Choice(EVAL_SPLITS), help="Split every task is scored on: val while "
              "choosing hyperparameters, test only to report [default: test].")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False), help="Local checkpoint for both encoders: cign-pretrain's (either backbone) or, for ResNet18, torchvision / EZ-VSL / SLAVC.")
@click.option("--dim", type=int, help="Embedding width D of features and class tokens.")
@click.option("--depth", type=int, help="Self-attention layers (1/3/6/12).")
@click.option("--heads", type=int, help="Attention heads per layer.")
@click.option("--visual-stride", type=int, help="Stride of cnn8's first visual convolution: 2 halves a cpu-preset step's FLOPs at a cost in visual "
              "accuracy (docs/cign-train.md) [default: 1].")
@click.option("--assign", type=click.Choice(["soft", "hard"]), help="Grouping assignment (Table 5).")
@click.option("--no-avctd", is_flag=True, help="Drop token distillation + token CE (Table 4).")
@click.option("--no-avcg", is_flag=True, help="Drop the continual-grouping loss (Table 4).")
@click.option("--ctl-denominator", type=click.Choice(CTL_DENOMINATORS),
              help="Eq 9's denominator: infonce (positive + negatives, default) or paper (negatives only, as written).")
@click.option("--ctl-negatives", type=click.Choice(CTL_NEGATIVES), help="Eq 9's negative per new-class sample: "
              "maxpool (its class slot most similar to the anchor, default) or label (the slot of its own class).")
@click.option("--token-source", type=click.Choice(TOKEN_SOURCES), help="What eq 8's KL and CE read as the class "
              "tokens: contextual (each sample's c_hat_a,i, c_hat_v,i of eqs 1-2, default) or table (the raw tokens).")
@click.option("--teacher-bn", type=click.Choice(TEACHER_BN), help="BatchNorm statistics of the frozen previous "
              "model: batch (as the student's in training, default) or running (eval mode).")
@click.option("--tau", type=click.FloatRange(min=0, min_open=True), help="Temperature of eq 9's cosine similarities "
              "(the paper gives none) [default: 0.07].")
@click.option("--kl-temperature", type=click.FloatRange(min=0, min_open=True), help="Temperature of eq 8's token "
              "distributions: the KL is about (1 - cosine) / T^2, so T sets its weight (docs/paper-choices.md) [default: 1].")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder [default: runs/DATASET-METHOD-seedSEED].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished task and epoch, with "
              "the settings of its config.json (other options may only repeat them; --threads, --workers, "
              "--no-progress may differ).")
@click.option("--reuse", is_flag=True, help="Train into --out, or reuse the run it holds when its settings are these: "
              "continue it where it stopped, or report it when it is finished (make demo's way; a run with other "
              "settings is refused, naming them).")
@click.option("--stop-after", type=click.IntRange(min=0), help="Stop once task T (0-based) is trained and "
              "checkpointed; --resume goes on with the next (e.g. a model to enrol classes into on the device).")
@click.option("--no-progress", is_flag=True, help="No progress bars (one line per task still prints).")
def main(dataset, name, data_dir, preset, method, epochs, first_task_epochs, batch_size, lr, encoder_lr, audio_encoder_lr, visual_encoder_lr, lr_schedule, warmup, tasks, class_order, max_per_class,
         buffer_per_class, buffer_select, rehearsal_sampling, augment, seed, device, amp, threads, workers, eval_split, encoder_weights, dim, depth, heads,
         visual_stride, assign, no_avctd, no_avcg, ctl_denominator, ctl_negatives, token_source, teacher_bn, tau, kl_temperature, out, resume, reuse, stop_after, no_progress, **method_options):
    """Train CIGN (or another --method) task by task, evaluate, and print the results table."""
    if threads is not None:
        torch.set_num_threads(threads)
    out = out or Path("runs") / f"{name if dataset == 'csv' and name else dataset}-{method}-seed{seed}"
    ctx = click.get_current_context()
    if resume and reuse:
        raise click.UsageError("--resume and --reuse contradict each other: --resume continues the run in --out with its "
                               "own settings, --reuse trains with these settings or reuses a run of them")
    if resume:
        settings = resume_settings(ctx, out)
    else:
        if preset is None and dataset == "csv":
            preset = csv_preset(data_dir, name) if name else "paper"  # without --name the settings refuse it below
        preset = preset or get_definition(dataset).preset
        refuse_inapplicable(ctx, method)
        try:
            settings = preset_settings(
                preset, dataset=dataset, name=name, data_dir=str(data_dir), method=method, epochs=epochs, first_task_epochs=first_task_epochs, batch_size=batch_size,
                lr=lr, **encoder_rates(ctx.params), lr_schedule=lr_schedule, warmup=warmup, tasks=tasks, class_order=class_order, max_per_class=max_per_class,
                buffer_per_class=buffer_per_class, buffer_select=buffer_select, rehearsal_sampling=rehearsal_sampling, augment=augment, seed=seed, device=device, amp=amp,
                workers=workers, encoder_weights=encoder_weights, eval_split=eval_split,
                method_options=get_method(method).resolve_options({k: v for k, v in method_options.items() if v is not None}),
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        model_overrides = {k: v for k, v in dict(dim=dim, depth=depth, heads=heads, visual_stride=visual_stride, assign=assign,
                                                 ctl_denominator=ctl_denominator, ctl_negatives=ctl_negatives,
                                                 token_source=token_source, teacher_bn=teacher_bn, tau=tau,
                                                 kl_temperature=kl_temperature).items()
                           if v is not None}
        if no_avctd:
            model_overrides["use_avctd"] = False
        if no_avcg:
            model_overrides["use_avcg"] = False
        if model_overrides:
            try:
                settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, **model_overrides))
            except ValueError as e:
                raise click.UsageError(str(e)) from e
    if reuse:
        resume = reusable(settings, out)
    try:
        if settings.dataset == "avdigits" and int(os.environ.get("RANK", "0")) == 0:  # the other ranks wait to join
            ensure_avdigits(settings.data_dir, settings.spec, progress=not no_progress)
        trainer = Trainer(settings, out, progress=not no_progress)
        metrics = trainer.run(resume=resume, stop_after=stop_after)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as e:
        raise click.ClickException(str(e)) from e
    if trainer.dist.main:
        click.echo(results_table(metrics, f"{settings.method} on {settings.store_name}, {len(metrics['accuracy_matrix']['audio'])} "
                                          f"tasks, {metrics['eval_split']} split (%)"))
        click.echo(f"results in {out}/ (metrics.json, metrics.csv, accuracy_matrix.png, task_*.pt)")
        guarded = {a: sum(n) for a, n in metrics["guarded_steps"].items()}
        if any(guarded.values()):
            click.echo(f"non-finite gradients: {guarded['fp32']} step(s) redone in fp32, {guarded['skipped']} skipped "
                       f"(per task in metrics.json, per step in {out / 'steps.jsonl'})")
        for warning in metrics["warnings"]:
            click.echo(f"WARNING: {warning}", err=True)


if __name__ == "__main__":
    main()
