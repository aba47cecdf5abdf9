"""``cign-enroll``: add a class to a tokens-as-input export from a few clips or live shots, without torch."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from cign_runtime import enroll as en


def clips_from_csv(path: Path) -> list[str]:
    """The ``path`` column (or the first column) of a CSV, relative paths taken from the CSV's folder."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise click.UsageError(f"{path}: empty CSV")
    col = rows[0].index("path") if "path" in rows[0] else 0
    body = rows[1:] if "path" in rows[0] else rows
    return [str(p if Path(p).is_absolute() else path.parent / p) for p in (r[col] for r in body if r)]


#: The fit's flags (FitOptions' fields but the seed), shared by cign-enroll and cign-live --enroll.
FIT_FLAGS = ("steps", "lr", "init", "negatives", "loss", "positive_weight")


def fit_flags(command):
    """Add the fit's options (``FitOptions``' defaults) to a click command; :func:`fit_options` reads them back."""
    flags = [
        click.option("--steps", type=click.IntRange(min=0), default=en.FitOptions.steps, show_default=True,
                     help="Adam steps on the token."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=en.FitOptions.lr, show_default=True),
        click.option("--init", type=click.Choice(en.INITS), default=en.FitOptions.init, show_default=True,
                     help="The token's start: the old tokens' mean, or the shots' mean feature."),
        click.option("--negatives", type=click.IntRange(min=0), default=en.FitOptions.negatives, show_default=True,
                     help="Exemplar features per step (class-balanced)."),
        click.option("--loss", type=click.Choice(en.LOSSES), default=en.FitOptions.loss, show_default=True,
                     help="bce: eq 10's terms on p_a and p_v; ce: cross-entropy over ln p_av, the inference rule."),
        click.option("--positive-weight", type=click.FloatRange(0, 1, min_open=True),
                     default=en.FitOptions.positive_weight, show_default=True,
                     help="Share of the loss on the shots (the exemplars have the rest)."),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return command


def fit_options(params: dict, seed: int = 0) -> en.FitOptions:
    """The FitOptions of a command's parameters (those of :func:`fit_flags`)."""
    return en.FitOptions(**{k: params[k] for k in FIT_FLAGS}, seed=seed)


def emit(event: dict) -> None:
    click.echo(json.dumps(event))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("clips", nargs=-1, type=click.Path(path_type=Path))
@click.option("--name", help="Name of the class to enrol (or the new name with --rename).")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Shot clips listed in a CSV (a 'path' column, or the first column).")
@click.option("--camera", help="Capture the shots live: device index or path, or a stream URL (with --mic, --shots).")
@click.option("--mic", help="Microphone of the live capture: 'default', a PortAudio name or index.")
@click.option("--shots", type=click.IntRange(min=1), default=en.SHOTS, show_default=True, help="Live capture: shots to take.")
@click.option("--countdown", type=click.FloatRange(min=0), default=en.COUNTDOWN, show_default=True,
              help="Live capture: seconds of countdown before each shot.")
@click.option("--list", "list_", is_flag=True, help="List the export's classes and versions, then exit.")
@click.option("--remove", help="Forget this class: a new version without its token (re-enrol to restore it).")
@click.option("--rename", help="Rename this class to --name in a new version.")
@fit_flags
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-level-dbfs", type=float, default=en.MIN_LEVEL_DBFS, show_default=True,
              help="Shots with a quieter audio RMS are refused as silent.")
@click.option("--min-frame-mean", type=float, default=en.MIN_FRAME_MEAN, show_default=True,
              help="Shots whose frame's mean value (0-255) is lower are refused as black.")
def main(export, clips, name, csv_path, camera, mic, shots, countdown, list_, remove, rename, seed, min_level_dbfs,
         min_frame_mean, **fit):
    """Enrol class --name into EXPORT from CLIPS (files), --csv, or live shots (--camera/--mic), writing a new
    version EXPORT.rN beside it; or --list, --remove NAME, --rename OLD --name NEW."""
    try:
        if list_:
            click.echo(en.describe(export))
            return
        if remove:
            click.echo(f"removed {remove!r}: {en.remove(export, remove)}")
            return
        if name is None:
            raise click.UsageError("--name is required (the class to enrol, or --rename's new name)")
        if rename:
            click.echo(f"renamed {rename!r} to {name!r}: {en.rename(export, rename, name)}")
            return
        opt = fit_options(fit, seed)
        source = en.Export(export)  # refuses a wrong export before any shot is taken
        en.check_name(source.manifest, name)
        spec = source.manifest.spec
        paths = list(clips) + (clips_from_csv(csv_path) if csv_path else [])
        if camera is not None or mic is not None:
            if paths:
                raise click.UsageError("give clips or --camera/--mic, not both")
            if camera is None or mic is None:
                raise click.UsageError("live shots need both --camera and --mic")
            accepted = capture(camera, mic, spec, shots, countdown, min_level_dbfs, min_frame_mean)
            refused: list[str] = []
        else:
            if not paths:
                raise click.UsageError("give the shots: CLIPS, --csv, or --camera with --mic")
            report = en.load_shots(paths, spec, min_level_dbfs, min_frame_mean)
            accepted, refused = report.accepted, report.refused
        for line in refused:
            click.echo(f"refused: {line}", err=True)
        if refused:
            click.echo(f"{len(refused)} of {len(paths)} clips refused; enrolling from the {len(accepted)} others", err=True)
        out, record = en.enroll(export, name, accepted, opt)
    except en.EnrollError as e:
        raise click.ClickException(str(e)) from e
    checks = ", ".join(f"{p} {c['shots_top1_new']:.0%}" for p, c in record["checks"].items())
    click.echo(f"enrolled {name!r} from {record['shots']} shots in {record['seconds']:.1f} s "
               f"(fit {record['fit']['seconds']:.1f} s); shots named {name!r} by: {checks}\n{out}")


def capture(camera: str, mic: str, spec, n: int, countdown: float, min_level_dbfs: float, min_frame_mean: float):
    """Guided capture on live devices: JSON-line prompts, each shot checked and retaken when refused."""
    from cign_runtime.audio import AudioSourceError, open_audio
    from cign_runtime.video import VideoSource, VideoSourceError

    try:
        audio = open_audio(mic, spec.sample_rate, spec.clip_seconds, realtime=True).start()
        video = VideoSource(camera, realtime=True)
        video.start()
    except (AudioSourceError, VideoSourceError) as e:
        raise en.EnrollError(str(e)) from e
    try:
        return en.capture_shots(video, audio, spec, n, countdown, emit, min_level_dbfs, min_frame_mean)
    finally:
        video.stop()
        audio.stop()


if __name__ == "__main__":
    sys.exit(main())
