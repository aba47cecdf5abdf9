"""Audio mixtures: a target word, a quieter distractor word and coloured noise on one track."""
from __future__ import annotations

import numpy as np

#: Samples quieter than this fraction of the peak at either end of a word count as silence.
_SILENCE = 0.02
#: Peak level of the finished mixture (headroom below AAC clipping).
_PEAK = 0.9


def trim(word: np.ndarray) -> np.ndarray:
    """Drop the leading and trailing silence eSpeak puts around a word."""
    loud = np.flatnonzero(np.abs(word) > _SILENCE * np.abs(word).max())
    return word[loud[0] : loud[-1] + 1]


def coloured_noise(rng: np.random.Generator, n: int, tilt: float) -> np.ndarray:
    """Unit-RMS Gaussian noise with power spectrum ~ 1/f^tilt (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]  # keep DC finite
    noise = np.fft.irfft(spectrum * freqs ** (-tilt / 2), n)
    return noise / np.sqrt(np.mean(noise**2))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def random_onset(rng: np.random.Generator, length: int, window: tuple[int, int]) -> int:
    """A start sample such that ``length`` samples fit inside ``window`` = (start, stop)."""
    start, stop = window
    if length > stop - start:
        raise ValueError(f"a {length}-sample word does not fit the {stop - start}-sample window")
    return int(rng.integers(start, stop - length + 1))


def mixture(
    n: int,
    target: np.ndarray,
    target_at: int,
    distractor: np.ndarray,
    distractor_at: int,
    distractor_db: float,
    noise: np.ndarray,
    snr_db: float,
) -> np.ndarray:
    """Mix ``n`` samples: target at unit level, distractor ``distractor_db`` below it, noise at ``snr_db``.

    Levels are RMS over each word's own (trimmed) samples, so the SNR is that of the speech while
    it is spoken. The result is scaled to a fixed peak.
    """
    track = noise[:n] * 10 ** (-snr_db / 20)
    track[target_at : target_at + len(target)] += target / rms(target)
    distractor_gain = 10 ** (-distractor_db / 20) / rms(distractor)
    track[distractor_at : distractor_at + len(distractor)] += distractor * distractor_gain
    return (track * (_PEAK / np.abs(track).max())).astype(np.float32)
