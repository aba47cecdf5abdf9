"""Video frames: one handwritten sklearn digit on a cluttered, degraded background."""
from __future__ import annotations

import functools

import cv2
import numpy as np
from sklearn.datasets import load_digits

from .config import AvdigitsConfig

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: Fragments of other digits are fainter than the target digit, so the target stays the salient one.
_FRAGMENT_CONTRAST = 0.5


@functools.cache
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as float32 (N, 8, 8) ink in [0, 1], and their labels (N,)."""
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def render(
    rng: np.random.Generator,
    digit: np.ndarray,
    fragments: list[np.ndarray],
    n_frames: int,
    config: AvdigitsConfig,
) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB showing ``digit`` (8x8 ink) with ``fragments`` as clutter.

    The scene is static; each frame adds a one-pixel camera shake and fresh sensor noise.
    """
    size = config.frame_size
    canvas = _background(rng, size)
    _draw_shapes(rng, canvas, config.clutter_shapes)
    canvas = canvas.astype(np.float32) / 255.0
    side = size * rng.uniform(*config.digit_scale)
    for fragment in fragments:
        rows, cols = rng.integers(3, 6, size=2)
        top, left = rng.integers(0, 9 - rows), rng.integers(0, 9 - cols)
        piece = fragment[top : top + rows, left : left + cols]
        # fragments keep the target's stroke width: same pixels per digit cell
        glyph = _glyph(piece, side / 8 * np.array([cols, rows]), rng.uniform(0, 360))
        _stamp(rng, canvas, glyph, _FRAGMENT_CONTRAST * rng.uniform(*config.digit_contrast))
    glyph = _glyph(digit, np.array([side, side]), rng.uniform(-1, 1) * config.digit_rotation)
    _stamp(rng, canvas, glyph, rng.uniform(*config.digit_contrast))
    sigma = rng.uniform(*config.blur_sigma)
    if sigma > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    # one noise field, cropped at a random offset per frame: fresh-looking noise at little cost
    noise = rng.uniform(*config.pixel_noise) * rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        dy, dx = rng.integers(-1, 2, size=2)
        y, x = rng.integers(0, size + 1, size=2)
        frame = np.roll(canvas, (dy, dx), axis=(0, 1)) + noise[y : y + size, x : x + size]
        frames[t] = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return frames


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blobs around a base colour: a coarse random grid upsampled (cubic)."""
    cells = int(rng.integers(2, 6))
    base = rng.uniform(40, 215, 3)
    coarse = (base + rng.uniform(-70, 70, (cells, cells, 3))).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth, 0, 255).astype(np.uint8)


def _draw_shapes(rng: np.random.Generator, canvas: np.ndarray, n: int) -> None:
    """Draw ``n`` random anti-aliased lines, circles, rectangles and ellipses in place."""
    size = canvas.shape[0]
    for _ in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        thickness = -1 if rng.random() < 0.25 else int(rng.integers(1, 4))
        p, q = (tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2))
        kind = rng.integers(4)
        if kind == 0:
            cv2.line(canvas, p, q, colour, max(thickness, 1), cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(canvas, p, int(rng.integers(3, size // 5)), colour, thickness, cv2.LINE_AA)
        elif kind == 2:
            cv2.rectangle(canvas, p, q, colour, thickness, cv2.LINE_AA)
        else:
            axes = tuple(int(v) for v in rng.integers(3, size // 5, 2))
            cv2.ellipse(canvas, p, axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, cv2.LINE_AA)


def _glyph(ink: np.ndarray, wh: np.ndarray, angle: float) -> np.ndarray:
    """``ink`` scaled to ``wh`` = (width, height) px with cubic interpolation and rotated by
    ``angle`` degrees on a square canvas that holds any rotation; returns an alpha mask."""
    w, h = np.maximum(np.round(wh).astype(int), 2)
    scaled = np.clip(cv2.resize(ink, (int(w), int(h)), interpolation=cv2.INTER_CUBIC), 0, 1)
    side = int(np.ceil(np.hypot(w, h))) + 2
    square = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = scaled
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    return cv2.warpAffine(square, turn, (side, side), flags=cv2.INTER_LINEAR)


def _stamp(rng: np.random.Generator, canvas: np.ndarray, alpha: np.ndarray, contrast: float) -> None:
    """Blend a random-colour glyph into ``canvas`` (float RGB in [0, 1]) at a random place.

    The colour differs in luminance from the background under it by ``contrast`` (towards the
    side with more room), plus a random hue shift.
    """
    size, side = canvas.shape[0], alpha.shape[0]
    margin = 1  # room for the camera shake
    top, left = (int(rng.integers(margin, max(size - side - margin, margin) + 1)) for _ in range(2))
    region = canvas[top : top + side, left : left + side]
    alpha = alpha[: region.shape[0], : region.shape[1], None]
    under = (region * alpha).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-6)
    luma = float(under @ _LUMA)
    hue = rng.normal(0.0, 0.15, 3).astype(np.float32)
    hue -= hue @ _LUMA  # zero luminance change
    colour = np.clip(under + hue + (contrast if luma < 0.5 else -contrast), 0, 1)
    region[...] = region * (1 - alpha) + colour * alpha
