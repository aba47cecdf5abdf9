"""Mixed-precision choice (--amp) on CPU: what autocast runs in, and clear refusals."""
import pytest
import torch

from cign_train.precision import autocast, autocast_dtype, cpu_has_native_bf16

CPU = torch.device("cpu")


def test_explicit_choices_on_cpu():
    assert autocast_dtype("off", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast_dtype("half", CPU)


def test_auto_on_cpu_follows_native_bf16():
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype("auto", CPU) is expected


def test_autocast_context_runs_convolutions_in_the_chosen_dtype():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast(CPU, torch.bfloat16):
        assert conv(x).dtype is torch.bfloat16
    with autocast(CPU, None):
        assert conv(x).dtype is torch.float32
