"""``cign-prepare``: decode a data set's clips once into a prepared store."""
from __future__ import annotations

from pathlib import Path

import click

from cign_runtime.spec import PRESETS
from cign_runtime.decode import WINDOWS
from cign_train.data.definitions import DATASETS
from cign_train.data.ingest import Sources, prepare_dataset

_path = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(DATASETS), default="avdigits", show_default=True)
@click.option("--data-dir", type=_path, default=Path("data"), show_default=True, help="Stores live in DATA_DIR/DATASET/.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Preprocessing preset [default: the data set's].")
@click.option("--index", "index", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="vggsound.csv (VGGSound family) or a file,label[,split] CSV (--dataset csv).")
@click.option("--clips-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of {youtube_id}_{start:06d}.mp4 clips (csv: files are relative to it).")
@click.option("--splits-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="vgginstruments: folder of the official group_{t}_{split}.txt files.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="csv: class names in task order, one per line [default: sorted labels].")
@click.option("--name", help="csv: store folder name [default: the CSV's stem].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds splits and avdigits generation.")
@click.option("--workers", type=int, help="Decoding processes [default: all cores].")
@click.option("--min-audio-seconds", type=float, default=1.0, show_default=True,
              help="Shorter clips are rejected; longer ones shorter than the window are zero-padded.")
@click.option("--window", type=click.Choice(WINDOWS), default="center", show_default=True,
              help="Which window of a longer clip is the sample: the centred one (VGGSound clips are centred on "
                   "their event) or the loudest (own clips whose sound is off-centre).")
@click.option("--overwrite", is_flag=True, help="Rebuild a store that was prepared from different inputs or with another spec "
              "(avdigits, derived from its generated clips, is rebuilt without it).")
def main(dataset, data_dir, preset, index, clips_dir, splits_dir, classes_file, name, seed, workers,
         min_audio_seconds, window, overwrite):
    """Decode every clip of DATASET once (PyAV) into a memory-mapped prepared store."""
    sources = Sources(index=index, clips_dir=clips_dir, splits_dir=splits_dir, classes_file=classes_file, name=name)
    try:
        report = prepare_dataset(dataset, data_dir, sources, preset, seed, workers, min_audio_seconds, overwrite,
                                 window=window)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(report.summary())


if __name__ == "__main__":
    main()
