"""Class names, splits and the difficulty knobs of the avdigits data set."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cign_train.data.definitions import AVDIGITS_CLASSES as CLASSES  # class index = digit
from cign_train.data.definitions import SPLITS


@dataclass(frozen=True)
class AvdigitsConfig:
    """Generator settings. Ranges are (low, high), sampled uniformly per clip.

    The defaults aim at a benchmark where each modality alone reaches roughly 70-90 % test accuracy
    for a CPU-sized encoder trained jointly, and both together more; every difficulty knob is here
    so a probe can retune them. The visual knobs were retuned with such a probe (the
    ``cnn8`` encoder of ``cign_train.model.encoders`` as a 10-class classifier, 8 epochs, AdamW
    1e-3, val split, seed 0): with digits at 0.22-0.45 of the frame, contrast 0.25-0.65, 6 clutter
    shapes and a fragment of another digit it reached 56.5 % after 10 epochs (ResNet18: chance),
    with the values below 82.5 % after 8; the audio knobs are unchanged (58 % on
    the former linear spectrogram; the ``cpu`` spec's log-mel front end brought it to 81.7 %).
    """

    # size: clips per class in each split
    train_per_class: int = 160
    val_per_class: int = 20
    test_per_class: int = 40
    # held-out conditions: fractions of each class's 8x8 sklearn images in the train/val/test
    # image pools, and the fraction of voice variants held out from training (val and test use them)
    image_split: tuple[float, float, float] = (0.6, 0.15, 0.25)
    heldout_voices: float = 0.35
    # clip timing: the analysis window (centred on the clip) holds both spoken words
    clip_seconds: float = 4.0
    window_seconds: float = 3.0
    # audio: target speech level over noise (dB, RMS while the word is spoken); the noise power
    # spectrum is 1/f^tilt (0 white .. 2 brown); the distractor word is this many dB below the target
    snr_db: tuple[float, float] = (-6.0, 4.0)
    noise_tilt: tuple[float, float] = (0.0, 2.0)
    distractor_db: tuple[float, float] = (3.0, 9.0)
    # speech prosody: eSpeak words per minute, base pitch and pitch range (0..100)
    speed_wpm: tuple[int, int] = (120, 230)
    pitch: tuple[int, int] = (15, 85)
    pitch_range: tuple[int, int] = (20, 90)
    # video: square frame side (px) and frame rate
    frame_size: int = 128
    fps: int = 8
    # digit: side as a fraction of the frame side, rotation (+- degrees), and luminance
    # difference from the background under it (fraction of full range)
    digit_scale: tuple[float, float] = (0.3, 0.5)
    digit_rotation: float = 15.0
    digit_contrast: tuple[float, float] = (0.35, 0.7)
    # clutter: random lines/shapes, and stroke fragments cut from other digits (drawn fainter)
    clutter_shapes: int = 4
    clutter_fragments: int = 0
    # degradation: Gaussian blur sigma (px at frame_size) and per-frame pixel noise (std, fraction of range)
    blur_sigma: tuple[float, float] = (0.0, 1.2)
    pixel_noise: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # JSON gives lists; keep the config hashable
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        if min(self.train_per_class, self.val_per_class, self.test_per_class) < 1:
            raise ValueError("every split needs at least one clip per class")
        if abs(sum(self.image_split) - 1.0) > 1e-6 or min(self.image_split) <= 0:
            raise ValueError(f"image_split must be three positive fractions summing to 1: {self.image_split}")
        if not 0 < self.heldout_voices < 1:
            raise ValueError(f"heldout_voices must be in (0, 1): {self.heldout_voices}")
        if not 0 < self.window_seconds <= self.clip_seconds - 0.5:
            raise ValueError("the analysis window needs >= 0.25 s of margin each side of the clip")
        for name in ("snr_db", "noise_tilt", "distractor_db", "speed_wpm", "pitch", "pitch_range",
                     "digit_scale", "digit_contrast", "blur_sigma", "pixel_noise"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} range is reversed: {(low, high)}")
        if self.digit_scale[1] > 0.65:
            raise ValueError("digits larger than 0.65 of the frame do not fit once rotated and jittered")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
