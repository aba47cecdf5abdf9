"""A calibration reader over in-memory arrays, for the INT8 tests on hand-built graphs."""
from __future__ import annotations

from onnxruntime.quantization import CalibrationDataReader


class ArrayReader(CalibrationDataReader):
    """Feeds {name: batch} once per batch of ``batches``, then None."""

    def __init__(self, name: str, batches):
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)
