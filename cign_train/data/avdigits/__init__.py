"""avdigits: an embedded audio-visual digit data set written as real mp4 clips.

Frames show scikit-learn's handwritten 8x8 digits in clutter; audio is the digit's English
name spoken by eSpeak NG amid noise and a quieter distractor word. See ``generate``.
"""
from .config import CLASSES, AvdigitsConfig
from .generate import generate

__all__ = ["CLASSES", "AvdigitsConfig", "generate"]
