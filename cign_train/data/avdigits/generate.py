"""Generate the avdigits data set: mp4 clips, a VGGSound-style index CSV and a cache record.

Layout under ``root``::

    clips/avd00042_000000.mp4   one clip per row: H.264 video + mono AAC audio
    avdigits.csv                rows ``id,start_seconds,label,split`` (no header)
    avdigits.json               version, seed and config; equal on a later call -> nothing to do

Each clip's random choices come only from (seed, clip index), and speech synthesis is a pure
function of its arguments, so the files are the same for any number of workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import mix, scene
from .config import CLASSES, AvdigitsConfig
from .media import write_mp4
from .speech import ACCENTS, Voice, synthesise
from .splits import Clip, Pools, plan, pools, rng_for

#: Bump when the generator's output changes for the same config and seed.
VERSION = 1
_CLIP_STREAM = 1  # seed-sequence key prefix for per-clip randomness


def generate(
    root: Path,
    config: AvdigitsConfig | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the data set under ``root`` (skipped when already complete); returns the CSV path."""
    config = config or AvdigitsConfig()
    root = Path(root)
    csv_path, record_path, clips_dir = root / "avdigits.csv", root / "avdigits.json", root / "clips"
    record = {"version": VERSION, "seed": seed, "config": config.to_dict()}
    clips = plan(config)
    if _complete(record_path, record, csv_path, clips_dir, clips):
        return csv_path
    clips_dir.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)  # the record marks a finished set
    _write_clips(config, seed, clips, clips_dir, workers, progress)
    wanted = {clip.filename for clip in clips}
    for stale in clips_dir.glob("avd*"):
        if stale.name not in wanted:
            stale.unlink()
    csv_path.write_text("".join(f"{c.id},{c.start},{CLASSES[c.label]},{c.split}\n" for c in clips))
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return csv_path


def render_frames(rng: np.random.Generator, config: AvdigitsConfig, split_pools: Pools, split: str,
                  label: int) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of an image of digit ``label`` from ``split``'s image pool, in clutter."""
    images, _ = scene.digit_images()
    by_class = split_pools.images[split]
    others = np.concatenate([by_class[c] for c in range(len(CLASSES)) if c != label])
    fragments = [images[i] for i in rng.choice(others, config.clutter_fragments)]
    n_frames = int(round(config.clip_seconds * config.fps))
    return scene.render(rng, images[rng.choice(by_class[label])], fragments, n_frames, config)


def render_clip(config: AvdigitsConfig, seed: int, clip: Clip) -> tuple[np.ndarray, np.ndarray, int]:
    """Frames (T, H, W, 3) uint8, mono float32 audio and its sample rate for one clip."""
    rng = rng_for(seed, _CLIP_STREAM, clip.index)
    split_pools = pools(config, seed)
    frames = render_frames(rng, config, split_pools, clip.split, clip.label)

    variants = split_pools.variants[clip.split]
    target_variant, distractor_variant = rng.choice(variants, 2, replace=False)
    distractor_label = (clip.label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
    target, rate = synthesise(CLASSES[clip.label], _voice(rng, str(target_variant), config))
    distractor, _ = synthesise(CLASSES[distractor_label], _voice(rng, str(distractor_variant), config))
    target, distractor = mix.trim(target), mix.trim(distractor)
    n = int(round(config.clip_seconds * rate))
    lead = int(round((config.clip_seconds - config.window_seconds) / 2 * rate))
    window = (lead, n - lead)
    audio = mix.mixture(
        n,
        target,
        mix.random_onset(rng, len(target), window),
        distractor,
        mix.random_onset(rng, len(distractor), window),
        rng.uniform(*config.distractor_db),
        mix.coloured_noise(rng, n, rng.uniform(*config.noise_tilt)),
        rng.uniform(*config.snr_db),
    )
    return frames, audio, rate


def _voice(rng: np.random.Generator, variant: str, config: AvdigitsConfig) -> Voice:
    return Voice(
        accent=str(rng.choice(ACCENTS)),
        variant=variant,
        speed=int(rng.integers(config.speed_wpm[0], config.speed_wpm[1] + 1)),
        pitch=int(rng.integers(config.pitch[0], config.pitch[1] + 1)),
        pitch_range=int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
    )


def _write_clip(job: tuple[AvdigitsConfig, int, Clip, Path]) -> None:
    config, seed, clip, clips_dir = job
    frames, audio, rate = render_clip(config, seed, clip)
    write_mp4(clips_dir / clip.filename, frames, config.fps, audio, rate)


def _write_clips(
    config: AvdigitsConfig, seed: int, clips: list[Clip], clips_dir: Path, workers: int | None, progress: bool
) -> None:
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = [(config, seed, clip, clips_dir) for clip in clips]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    bar = tqdm(total=len(jobs), desc="avdigits", unit="clip", disable=not progress)
    with bar:
        if workers == 1:
            for job in jobs:
                _write_clip(job)
                bar.update()
            return
        # spawn: workers must not inherit thread pools (OpenCV, torch) from the parent
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_clip, jobs, chunksize=4):
                bar.update()


def _complete(record_path: Path, record: dict, csv_path: Path, clips_dir: Path, clips: list[Clip]) -> bool:
    """Whether a finished set with exactly this record is on disk."""
    if not (record_path.is_file() and csv_path.is_file()):
        return False
    if json.loads(record_path.read_text()) != record:
        return False
    return all((clips_dir / clip.filename).is_file() for clip in clips)
