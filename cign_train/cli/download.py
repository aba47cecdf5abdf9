"""``cign-download``: fetch the VGGSound family's listed YouTube segments into a clips folder."""
from __future__ import annotations

import shlex
import shutil
import string
import time
from pathlib import Path

import click
from tqdm import tqdm

try:
    from cign_train.data import download as dl
except ModuleNotFoundError as e:  # yt-dlp comes with the [download] extra
    if e.name != "yt_dlp":
        raise
    raise SystemExit("cign-download needs yt-dlp: pip install 'cign-edge[train,download]'") from e
from cign_train.data.definitions import get_definition
from cign_train.data.ledger import Ledger, class_floor, human_size, summary

_file = click.Path(exists=True, dir_okay=False, path_type=Path)


def read_classes(path: Path, dataset: str) -> tuple[str, ...]:
    """The labels listed in ``path``, one per line; a click error names those that are not classes of ``dataset``."""
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    unknown = [name for name in names if name not in get_definition(dataset).classes]
    if unknown:
        raise click.ClickException(f"{path}: not classes of {dataset}: {unknown}")
    return names


def check_template(ctx, param, template: str) -> str:
    """``--url-template``: it names ``{youtube_id}`` and no other field."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields != {"youtube_id"}:
        raise click.BadParameter(f"{template!r} must name {{youtube_id}} and no other field")
    return template


def prepare_command(dataset: str, index: Path | None, splits_dir: Path | None, out: Path) -> str:
    """The cign-prepare command that reads these clips."""
    listing = ["--splits-dir", str(splits_dir)] if splits_dir else ["--index", str(index)]
    return shlex.join(["cign-prepare", "--dataset", dataset, *listing, "--clips-dir", str(out)])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(dl.DATASETS), required=True)
@click.option("--index", type=_file, help="VGGSound's vggsound.csv (rows youtube_id,start_seconds,label,split).")
@click.option("--splits-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="vgginstruments: folder of the official group_{t}_{split}.txt files (instead of --index).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Clips folder (cign-prepare's --clips-dir); it keeps the ledger download.jsonl.")
@click.option("--classes", "classes_file", type=_file, help="Only these classes: VGGSound labels, one per line.")
@click.option("--max-per-class", type=click.IntRange(min=1), help="At most N rows per class (the first by clip id).")
@click.option("--jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Parallel downloads (processes).")
@click.option("--interval", type=click.FloatRange(min=0), default=dl.Fetcher.interval, show_default=True,
              help="Seconds between the starts of two downloads, all jobs together.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=dl.Fetcher.timeout, show_default=True,
              help="Seconds without an answer before a network operation fails (status timeout).")
@click.option("--attempts", type=click.IntRange(min=1), default=dl.Fetcher.attempts, show_default=True,
              help="Tries per row and run of a transient failure (timeout, HTTP 5xx, rate limit, ...).")
@click.option("--backoff", type=click.FloatRange(min=0), default=dl.Fetcher.backoff, show_default=True,
              help=f"Seconds before the second try; doubles with each further one, up to {dl.MAX_BACKOFF:g}.")
@click.option("--retry-failed", is_flag=True, help="Try again the rows that failed for good (private, removed, ...).")
@click.option("--cookies", type=_file, help="Netscape cookies file for yt-dlp (age-restricted videos, bot checks).")
@click.option("--url-template", default=dl.Fetcher.url_template, show_default=True, callback=check_template,
              help="Where a row's video is: a mirror of your institution, or a local server in tests.")
@click.option("--dry-run", is_flag=True, help="Say what would be fetched, fetch nothing.")
def main(dataset, index, splits_dir, out, classes_file, max_per_class, jobs, interval, timeout, attempts, backoff,
         retry_failed, cookies, url_template, dry_run):
    """Fetch the 10 s segment of every row of DATASET's classes as {youtube_id}_{start:06d}.mp4 (H.264 + AAC,
    at most 360 px high), resumably, then print per class what was obtained and the cign-prepare command."""
    if splits_dir and dataset != "vgginstruments":
        raise click.UsageError("--splits-dir is VGGSound-Instruments' official split: use it with --dataset vgginstruments")
    if shutil.which("ffmpeg") is None:
        raise click.ClickException("ffmpeg is not on PATH: yt-dlp cuts the segments with it (Debian: apt install "
                                   "ffmpeg; scripts/setup.sh installs it)")
    classes = read_classes(classes_file, dataset) if classes_file else None
    try:
        rows = dl.listed_rows(dataset, out, index, splits_dir, classes, max_per_class)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        removed = dl.remove_temporaries(out)
        if removed:
            click.echo(f"{out}: removed {removed} temporary file(s) of a run stopped midway")
    ledger = Ledger(out)
    todo = ledger.pending(rows, retry_failed)
    click.echo(f"{dataset}: {len(rows)} rows listed, {len(rows) - len(todo)} done or failed for good, {len(todo)} to fetch")
    started, interrupted = time.monotonic(), False
    if todo and dry_run:
        click.echo(f"would fetch {len(todo)} rows, the first from {url_template.format(youtube_id=todo[0].youtube_id)} "
                   f"({todo[0].start}-{todo[0].start + dl.SEGMENT_SECONDS:g} s) into {todo[0].path}")
        sizes = [r["bytes"] for r in ledger.records.values() if r["status"] == "ok"]
        if sizes:
            click.echo(f"the {len(sizes)} clips in place average {human_size(sum(sizes) / len(sizes))}: the "
                       f"{len(todo)} to fetch would take about {human_size(sum(sizes) / len(sizes) * len(todo))}")
    elif todo:
        fetcher = dl.Fetcher(url_template, timeout, attempts, backoff, interval, str(cookies) if cookies else None)
        bar = tqdm(total=len(todo), desc=f"download {dataset}", unit="clip")
        tally = {"ok": 0, "failed": 0}

        def advance(record):
            tally["ok" if record["status"] == "ok" else "failed"] += 1
            bar.set_postfix(tally, refresh=False)
            bar.update()

        try:
            dl.download(todo, ledger, fetcher, jobs, advance)
        except KeyboardInterrupt:
            interrupted = True
        bar.close()
    click.echo(summary(rows, ledger, class_floor(), None if dry_run else time.monotonic() - started))
    if ledger.path.is_file():
        click.echo(f"ledger: {ledger.path}")
    if interrupted:
        click.echo("interrupted: the clips in place are whole; run the same command again to go on", err=True)
        raise SystemExit(130)
    click.echo(f"next: {prepare_command(dataset, index, splits_dir, out)}")


if __name__ == "__main__":
    main()
