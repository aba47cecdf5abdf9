"""The machine a benchmark ran on: one definition, ``cign_runtime.bench.environment``."""
from cign_runtime.bench import cpu_label as label  # noqa: F401
from cign_runtime.bench import environment as describe  # noqa: F401
