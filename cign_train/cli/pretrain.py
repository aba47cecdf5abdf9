"""``cign-pretrain``: self-supervised audio-visual pretraining of the encoders on a prepared store."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from cign_runtime.spec import PRESETS
from cign_train.data.definitions import DATASETS
from cign_train.data.ingest import prepare_dataset, store_dir
from cign_train.data.store import PreparedStore
from cign_train.precision import AMP_CHOICES
from cign_train.pretrain import OBJECTIVES, PretrainSettings, pretrain
from cign_train.settings import PRESETS as TRAIN_PRESETS


def default_out(data_dir: Path, store_name: str, preset: str, seed: int) -> Path:
    """Where the pretrained encoders of a store go: beside it in the data folder, paid once."""
    return Path(data_dir) / store_name / "pretrained" / f"{preset}-seed{seed}.pt"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(DATASETS), default="avdigits", show_default=True)
@click.option("--name", help="csv: the store's folder name under --data-dir.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu", show_default=True,
              help="Preprocessing preset of the store to read; the encoders are that training preset's.")
@click.option("--epochs", type=click.IntRange(min=1), default=PretrainSettings.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=PretrainSettings.batch_size, show_default=True)
@click.option("--lr", type=float, default=PretrainSettings.lr, show_default=True)
@click.option("--objective", type=click.Choice(OBJECTIVES), default=PretrainSettings.objective, show_default=True,
              help="infonce: audio-visual correspondence (EZ-VSL, global); ezvsl: scored at the frame's best location; "
                   "clusters: cross-modal self-labelling (SeLaVi / SwAV); simclr: two augmented views within each "
                   "modality (SimCLR), + --cross x infonce.")
@click.option("--tau", type=float, default=PretrainSettings.tau, show_default=True, help="Temperature of the objective's logits.")
@click.option("--cross", type=click.FloatRange(min=0), default=PretrainSettings.cross, show_default=True,
              help="simclr: weight of the cross-modal InfoNCE term.")
@click.option("--prototypes", type=click.IntRange(min=2), default=PretrainSettings.prototypes, show_default=True,
              help="clusters: number of prototypes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--amp", type=click.Choice(AMP_CHOICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
@click.option("--workers", type=int, default=0, show_default=True, help="Loader processes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint [default: DATA_DIR/STORE/pretrained/PRESET-seedSEED.pt].")
@click.option("--no-progress", is_flag=True)
def main(dataset, name, data_dir, preset, epochs, batch_size, lr, objective, tau, cross, prototypes, seed, device, amp,
         threads, workers, out, no_progress):
    """Pretrain both encoders (the preset's backbone) on the store's training clips (labels unused); cign-train --encoder-weights loads it."""
    if threads is not None:
        torch.set_num_threads(threads)
    if dataset == "csv" and not name:
        raise click.UsageError("--dataset csv needs --name (the store cign-prepare wrote)")
    store_name = name if dataset == "csv" else dataset
    root = store_dir(data_dir, store_name, preset)
    if dataset == "avdigits" and not (root / "index.json").is_file():
        prepare_dataset("avdigits", data_dir, preset=preset, progress=not no_progress)
    try:
        store = PreparedStore(root)
        out = out or default_out(data_dir, store_name, preset, seed)
        model = TRAIN_PRESETS[preset]["model"]
        settings = PretrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, objective=objective, tau=tau,
                                    cross=cross, prototypes=prototypes, seed=seed, device=device, amp=amp, workers=workers,
                                    encoder=model.encoder, audio_pool=model.audio_pool)
        history = pretrain(store, settings, out, progress=not no_progress)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"pretrained encoders in {out} (train {objective} {history['train_loss'][0]:.3f} -> "
               f"{history['train_loss'][-1]:.3f}; val class retrieval {100 * history['val_class_retrieval'][-1]:.1f} %); "
               f"use: cign-train --encoder-weights {out}")


if __name__ == "__main__":
    main()
