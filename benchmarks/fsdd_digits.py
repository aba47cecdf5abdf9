"""Build ``fsdd_digits``: real spoken digits with avdigits frames, as mp4 clips and a ``cign-prepare`` CSV.

Audio: the Free Spoken Digit Dataset (FSDD, tag v1.0.10, CC BY-SA 4.0, Zohar Jackson et al.):
6 speakers x 10 digits x 50 recordings, ``recordings/{digit}_{speaker}_{index}.wav``, 8 kHz mono
16-bit. Each recording is resampled to 16 kHz (soxr HQ, as ``cign_runtime.audio`` resamples a
microphone) and placed at a seeded random onset inside the centred 3 s window of a 4 s clip, with
silence elsewhere: real recordings at their recorded level, no noise added. Frames: an image of the
same digit from the split's held-out avdigits image pool, rendered as avdigits renders it.

Split, by recording index for every (speaker, digit): 0-6 test (it holds FSDD's conventional test
set, 0-4), 7-10 val, 11-37 train, 38 and above unused; per class 162 / 24 / 42 clips.

Layout under ``--out``::

    clips/{digit}_{speaker}_{index}.mp4   H.264 + AAC, 4 s
    fsdd_digits.csv                       ``file,label,split`` (files relative to it), written last
    classes.txt, SOURCE.md, rejected.csv  class order, provenance, recordings that could not be used
    fsdd_digits.json                      seed and version; a resume with other ones is refused

Every clip's randomness comes from (seed, digit, speaker, index), so the files do not depend on
``--workers`` (default 1); existing clips are kept, so an interrupted build resumes.

    python3 benchmarks/fsdd_digits.py --out data/fsdd_digits [--archive PATH | --url URL] [--workers N]
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tarfile
import urllib.parse
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
from tqdm import tqdm

from cign_train.data.avdigits.config import CLASSES, AvdigitsConfig
from cign_train.data.avdigits.media import write_mp4
from cign_train.data.avdigits.mix import random_onset
from cign_train.data.avdigits.generate import render_frames
from cign_train.data.avdigits.splits import pools, rng_for
from cign_train.data.definitions import SPLITS

TAG = "v1.0.10"
REPO = "https://github.com/Jakobovski/free-spoken-digit-dataset"
#: GitHub's archive of the tag. Not pinned by hash: the content is checked instead (names, count, format).
URL = f"{REPO}/archive/refs/tags/{TAG}.tar.gz"
EXPECTED_RECORDINGS = 3000  # 6 speakers x 10 digits x 50
SOURCE_RATE = 8000
SAMPLE_RATE = 16000  # the cpu preset's rate
SPLIT_INDICES = {"test": range(0, 7), "val": range(7, 11), "train": range(11, 38)}
CONFIG = AvdigitsConfig()  # frame size, fps, clip and window length
VERSION = 1  # bump when the clips change for the same seed
DOWNLOAD_TIMEOUT_S = 60
_CLIP_STREAM = 2  # seed-sequence key prefix; avdigits uses 0 (image pools, shared here) and 1
_NAME = re.compile(r"([0-9])_([A-Za-z]+)_([0-9]+)\.wav")


class BuildError(Exception):
    """The build cannot go on; the message says why."""


@dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.digit}_{self.speaker}_{self.index}.wav"

    @property
    def clip(self) -> str:
        return f"clips/{self.digit}_{self.speaker}_{self.index}.mp4"

    @property
    def split(self) -> str | None:
        return next((s for s, indices in SPLIT_INDICES.items() if self.index in indices), None)


def download(url: str, folder: Path) -> Path:
    """``url`` saved in ``folder`` (via a ``.part`` file); an earlier complete download is reused."""
    path = folder / (Path(urllib.parse.urlparse(url).path).name or "fsdd.tar.gz")
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        partial.unlink(missing_ok=True)
        raise BuildError(f"could not download {url}: {e}") from e
    os.replace(partial, path)
    return path


def read_recordings(source: Path) -> dict[str, bytes]:
    """File name -> bytes of every ``.wav`` in a ``recordings`` folder of a .tar.gz or an extracted tree."""
    if source.is_dir():
        files = sorted(source.glob("recordings/*.wav")) or sorted(source.glob("*/recordings/*.wav"))
        return {p.name: p.read_bytes() for p in files}
    try:
        with tarfile.open(source, "r:*") as archive:
            return {
                Path(m.name).name: archive.extractfile(m).read()
                for m in archive
                if m.isfile() and Path(m.name).parent.name == "recordings" and m.name.endswith(".wav")
            }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BuildError(f"{source}: not a readable FSDD archive: {e}") from e


def parse_names(names: list[str]) -> tuple[list[Recording], list[tuple[str, str]]]:
    """Recordings named ``{digit}_{speaker}_{index}.wav``, and (name, problem) for the others."""
    found, rejected = [], []
    for name in sorted(names):
        match = _NAME.fullmatch(name)
        if match:
            found.append(Recording(int(match[1]), match[2], int(match[3])))
        else:
            rejected.append((f"recordings/{name}", "name is not {digit}_{speaker}_{index}.wav"))
    return found, rejected


def check_complete(recordings: list[Recording], expected: int) -> None:
    """Every speaker x digit x index of the set is there, and ``expected`` recordings in all."""
    keys = {(r.digit, r.speaker, r.index) for r in recordings}
    grid = itertools.product(*(sorted(set(axis)) for axis in zip(*keys)))
    missing = [Recording(*key).name for key in grid if key not in keys]
    if missing or len(recordings) != expected:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise BuildError(f"expected {expected} FSDD recordings, found {len(recordings)}"
                         + (f"; missing: {listed}" if missing else ""))


def load_wav(data: bytes) -> np.ndarray:
    """An 8 kHz mono 16-bit PCM wav as float32 in [-1, 1]; ValueError naming the problem otherwise."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            pcm = w.readframes(n)
    except Exception as e:  # malformed chunks surface as wave.Error, EOFError, RuntimeError, struct.error...
        raise ValueError(f"unreadable wav: {e or type(e).__name__}") from e
    if rate != SOURCE_RATE:
        raise ValueError(f"sample rate {rate} Hz, expected {SOURCE_RATE}")
    if channels != 1:
        raise ValueError(f"{channels} channels, expected mono")
    if width != 2:
        raise ValueError(f"{8 * width}-bit samples, expected 16-bit")
    if len(pcm) != 2 * n or n == 0:
        raise ValueError(f"{len(pcm) // 2} samples where the header announces {n}")
    if n / rate > CONFIG.window_seconds:
        raise ValueError(f"{n / rate:.2f} s long, longer than the {CONFIG.window_seconds:g} s window")
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0


def clip_audio(rng: np.random.Generator, recording: np.ndarray) -> np.ndarray:
    """The recording at 16 kHz, at a random onset inside the centred window of a silent clip."""
    speech = np.clip(soxr.resample(recording, SOURCE_RATE, SAMPLE_RATE, quality="HQ"), -1.0, 1.0)
    n = int(round(CONFIG.clip_seconds * SAMPLE_RATE))
    lead = int(round((CONFIG.clip_seconds - CONFIG.window_seconds) / 2 * SAMPLE_RATE))
    at = random_onset(rng, len(speech), (lead, n - lead))
    audio = np.zeros(n, np.float32)
    audio[at : at + len(speech)] = speech
    return audio


def _write_clip(job: tuple[Path, int, Recording, np.ndarray]) -> None:
    out, seed, rec, samples = job
    rng = rng_for(seed, _CLIP_STREAM, rec.digit, int.from_bytes(rec.speaker.encode(), "big"), rec.index)
    frames = render_frames(rng, CONFIG, pools(CONFIG, seed), rec.split, rec.digit)
    write_mp4(out / rec.clip, frames, CONFIG.fps, clip_audio(rng, samples), SAMPLE_RATE)


def _write_clips(jobs: list[tuple[Path, int, Recording, np.ndarray]], workers: int, progress: bool) -> None:
    with tqdm(total=len(jobs), desc="fsdd_digits", unit="clip", disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                _write_clip(job)
                bar.update()
            return
        # spawn: workers must not inherit thread pools (OpenCV, torch) from the parent
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_write_clip, jobs, chunksize=4):
                bar.update()


def _source_md(built_from: str, seed: int) -> str:
    """Provenance of the built set: SOURCE.md."""
    rules = "; ".join(f"{split} {r.start}-{r.stop - 1}" for split, r in SPLIT_INDICES.items())
    return f"""# fsdd_digits

Audio: the Free Spoken Digit Dataset (FSDD), {REPO}, tag {TAG},
licence CC BY-SA 4.0 (attribution: Zohar Jackson et al., Free Spoken Digit Dataset).
Built from {built_from}.
Frames: avdigits renderings of scikit-learn's handwritten digits (this project), seed {seed}.

Each clip holds one FSDD recording, resampled from {SOURCE_RATE} to {SAMPLE_RATE} Hz, at a random
onset inside the centred {CONFIG.window_seconds:g} s window of a {CONFIG.clip_seconds:g} s clip,
silence elsewhere (no noise added), with frames of the same digit from the split's held-out image
pool. These clips adapt FSDD and are shared under CC BY-SA 4.0.

Split by recording index, for every speaker and digit: {rules}; higher indices are unused.
"""


def build(out: Path, source: Path, built_from: str, seed: int = 0, workers: int = 1,
          expected: int = EXPECTED_RECORDINGS, progress: bool = True) -> dict[str, int]:
    """Write the set under ``out`` (resuming); returns counts per split, clips built now and rejected."""
    if workers < 1:
        raise BuildError(f"--workers must be >= 1, got {workers}")
    data = read_recordings(source)
    recordings, rejected = parse_names(list(data))
    if not recordings:
        raise BuildError(f"{source}: no recordings/{{digit}}_{{speaker}}_{{index}}.wav found")
    check_complete(recordings, expected)
    record = {"version": VERSION, "seed": seed, "tag": TAG}
    record_path, csv_path = out / "fsdd_digits.json", out / "fsdd_digits.csv"
    if record_path.is_file() and json.loads(record_path.read_text()) != record:
        raise BuildError(f"{out} holds a build with other settings ({record_path}); use a fresh --out")
    (out / "clips").mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record) + "\n")
    csv_path.unlink(missing_ok=True)  # present only when every clip is done

    used, jobs = [], []
    for rec in recordings:
        if rec.split is None:
            continue
        try:
            samples = load_wav(data[rec.name])
        except ValueError as e:
            rejected.append((f"recordings/{rec.name}", str(e)))
            continue
        used.append(rec)
        if not (out / rec.clip).is_file():
            jobs.append((out, seed, rec, samples))
    for name, problem in rejected:
        print(f"rejected {name}: {problem}", file=sys.stderr)
    _write_clips(jobs, workers, progress)

    with open(out / "rejected.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file", "problem"), *rejected])
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    (out / "SOURCE.md").write_text(_source_md(built_from, seed))
    used.sort(key=lambda r: (SPLITS.index(r.split), r.digit, r.speaker, r.index))
    partial = csv_path.with_name(csv_path.name + ".part")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file", "label", "split"), *((r.clip, CLASSES[r.digit], r.split) for r in used)])
    os.replace(partial, csv_path)
    counts = {split: sum(r.split == split for r in used) for split in SPLITS}
    return {**counts, "built": len(jobs), "rejected": len(rejected)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/fsdd_digits)")
    parser.add_argument("--archive", type=Path, help="a local FSDD .tar.gz or extracted folder (instead of --url)")
    parser.add_argument("--url", default=URL, help="FSDD archive to download into OUT/download/ [%(default)s]")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes [%(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="seeds image pools, images and onsets [%(default)s]")
    parser.add_argument("--expect-recordings", type=int, default=EXPECTED_RECORDINGS,
                        help="recordings the archive must hold [%(default)s: the full FSDD v1.0.10]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.archive is not None:
            if not args.archive.exists():
                raise BuildError(f"{args.archive}: no such archive or folder")
            source, built_from = args.archive, f"a local copy of the {TAG} archive ({args.archive.name})"
        else:
            source, built_from = download(args.url, args.out / "download"), args.url
        counts = build(args.out, source, built_from, args.seed, args.workers, args.expect_recordings,
                       not args.no_progress)
    except BuildError as e:
        print(f"fsdd_digits: error: {e}", file=sys.stderr)
        return 1
    total = sum(counts[s] for s in SPLITS)
    print(f"{args.out}: {total} clips (train {counts['train']}, val {counts['val']}, test {counts['test']}), "
          f"{counts['built']} built now; {counts['rejected']} rejected (listed in {args.out / 'rejected.csv'}); "
          f"index {args.out / 'fsdd_digits.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
