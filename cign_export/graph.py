"""The exported computation: raw inputs in, p_audio / p_visual / p_av out (Sec. 3.3, inference).

Normalisation lives in the graph (``cign_runtime.manifest.NORMALIZATION``): the runtime feeds
resized RGB frames and raw log spectrograms, so the spec's constants exist once, inside the
artefact whose hash the manifest holds, and a runtime can never pair a graph with other
statistics. In the graph it is one Sub + Div per input (constant-folded by TensorRT into the first
convolution's scale where it can); ``benchmarks/bench_export.py`` measures it against numpy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cign_runtime import manifest as mf
from cign_runtime.spec import PreprocessSpec
from cign_train.model import CIGN, predict


class Normalize(nn.Module):
    """The spec's normalisation (``cign_runtime.spec.normalize_frames`` / ``normalize_spectrogram``) as graph ops."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        mean = torch.tensor(spec.frame_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.frame_std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("frame_mean", mean)  # (1, 3, 1, 1) on the 0-255 scale
        self.register_buffer("frame_std", std)
        self.spec_mean, self.spec_std = float(spec.spec_mean), float(spec.spec_std)

    def forward(self, frame: torch.Tensor, spectrogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) RGB 0-255 and (N, 1, F, T) log power -> the model's normalised inputs."""
        return (frame - self.frame_mean) / self.frame_std, (spectrogram - self.spec_mean) / self.spec_std


class ExportGraph(nn.Module):
    """``(frame, spectrogram[, tokens]) -> (p_audio, p_visual, p_av)`` for one trained CIGN.

    frame (N, 3, H, W) float RGB in [0, 255]; spectrogram (N, 1, F, T) float log power; tokens
    (K, D) when ``tokens_as_input`` (one graph serves every task's table), else the model's table
    is a constant of the graph.

    ``dtype`` (PyTorch deployment, ``cign_export.torch_backend``): the model's weights and arithmetic in
    float16 / bfloat16. Inputs, normalisation and outputs stay float32, as in the FP16 ONNX
    (``calibration.fp16``): raw pixel values up to 255 keep their precision until they are normalised.
    float32 (the ONNX export) adds no cast.
    """

    def __init__(self, model: CIGN, spec: PreprocessSpec, tokens_as_input: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.eval().to(dtype)
        self.spec = spec
        self.tokens_as_input = tokens_as_input
        self.dtype = dtype
        self.normalize = Normalize(spec)

    def forward(self, frame: torch.Tensor, spectrogram: torch.Tensor, tokens: torch.Tensor | None = None):
        frames, spectrograms = self.normalize(frame, spectrogram)
        tokens = tokens if self.tokens_as_input else None
        if self.dtype != torch.float32:
            frames, spectrograms = frames.to(self.dtype), spectrograms.to(self.dtype)
            tokens = None if tokens is None else tokens.to(self.dtype)
        p = predict(self.model(spectrograms, frames, tokens))
        if self.dtype != torch.float32:
            return p.p_a.float(), p.p_v.float(), p.p_av.float()
        return p.p_a, p.p_v, p.p_av  # each (N, K)


def input_infos(spec: PreprocessSpec, dim: int, tokens_as_input: bool) -> list[mf.TensorInfo]:
    size = spec.frame_size
    infos = [
        mf.TensorInfo(mf.FRAME, ["batch", 3, size, size], "float32", "RGB in [0, 255], resized to the spec's frame size"),
        mf.TensorInfo(mf.SPECTROGRAM, ["batch", 1, spec.n_freq, spec.n_time], "float32",
                      "ln(|STFT|^2 + spec.log_eps) of the spec's analysis window, not normalised"),
    ]
    if tokens_as_input:
        infos.append(mf.TensorInfo(mf.TOKENS, ["classes", dim], "float32", "one task's class-token table (tokens_*.npy)"))
    return infos


def output_infos() -> list[mf.TensorInfo]:
    what = {"p_audio": "sigmoid(FC(g_a,i))", "p_visual": "sigmoid(FC(g_v,i))", "p_av": "p_audio * p_visual"}
    return [mf.TensorInfo(name, ["batch", "classes"], "float32", what[name]) for name in mf.OUTPUTS]

