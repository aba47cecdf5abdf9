"""Mixed precision: which autocast dtype a run uses on its device (``--amp``).

``auto`` picks bf16 on CUDA devices that support it (else fp16 with loss scaling), and bf16 on
CPUs that compute it natively (AVX512-BF16 or AMX, where oneDNN's bf16 convolutions beat fp32:
1.5x for the visual and 1.8x for the audio ResNet18 step at the cpu preset's shapes on a 2-core
AVX512-BF16 machine); elsewhere it stays in fp32. fp16 needs CUDA.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from cign_runtime import isa

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has avx512_bf16 or amx_bf16 for this process (not under ``cign_runtime.isa``'s
    AVX2 mask; False where /proc/cpuinfo cannot be read)."""
    flags = isa.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, None for fp32; raises where it cannot run."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu":
        if amp == "fp16":
            raise ValueError("--amp fp16 needs a CUDA device; use bf16 or off on CPU")
        if amp == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if amp == "auto":
        return None
    raise ValueError(f"--amp {amp} is not supported on device {device}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
