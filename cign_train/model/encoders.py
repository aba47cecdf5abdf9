"""Audio and visual encoders (paper Sec. 4.1: ResNet18) and loading of local pretrained weights.

``CIGNConfig.encoder`` picks the backbone of both (``cign_train.config.ENCODERS``):

- ``resnet18``: torchvision ``resnet18`` without its pooling and classifier, as in the paper; its
  state dict uses torchvision's key names, so a torchvision or audio-visual localisation checkpoint
  loads into it unchanged. The ``paper`` preset.
- ``cnn8``: a small VGG-style net for the ``cpu`` preset's 64 px frames and 32 x 301 log-mel
  spectrograms: four stages of two 3x3 conv-BN-ReLU layers (32, 64, 128, 256 channels) with 2x2
  max pooling between stages; the audio one starts with stride 2 (its input is 2.4x the frame's
  area). Our choice, not the paper's, measured on avdigits' val split (single-modality classifier,
  all 10 classes, 8 epochs, AdamW 1e-3, 2-core Xeon, bf16): ResNet18 at 64 px memorised the 1,600
  training frames (train loss 0.02) at 17 % val accuracy (34 % with a stride-1 3x3 stem, 4x the
  cost): its 7x7 stride-2 stem and max pool leave a 20-30 px digit a few pixels wide, and its 11 M
  parameters fit the scenes instead. ``cnn8`` reached 82.5 % (visual) and 58 % (audio, on the former
  129 x 101 linear spectrogram; ResNet18: ~50 %), an audio epoch 3x faster than ResNet18's.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import Conv2dNormActivation

from cign_train.config import CIGNConfig

CNN8_STAGES = (32, 64, 128, 256)  # output channels of cnn8's four stages, two conv layers each


class ResNet18Trunk(ResNet):
    """torchvision ResNet18 (random init) taking ``in_channels`` planes, without avgpool and fc."""

    def __init__(self, in_channels: int):
        super().__init__(BasicBlock, [2, 2, 2, 2])
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        del self.avgpool, self.fc
        self.out_channels = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> layer4 feature map (B, 512, H/32, W/32), rounded up."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CNN8(nn.Sequential):
    """``cnn8`` (module docstring): (B, C, H, W) -> (B, 256, H/8, W/8), or H/16, W/16 with ``first_stride`` 2."""

    def __init__(self, in_channels: int, first_stride: int = 1):
        layers: list[nn.Module] = []
        for i, width in enumerate(CNN8_STAGES):
            if i:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            for j in range(2):
                stride = first_stride if i == j == 0 else 1
                layers.append(Conv2dNormActivation(in_channels, width, 3, stride=stride, inplace=True))
                in_channels = width
        super().__init__(*layers)
        self.out_channels = in_channels


def backbone(cfg: CIGNConfig, modality: str) -> nn.Module:
    """The ``cfg.encoder`` backbone of ``modality`` ("audio" or "visual"), mapping to a feature map."""
    planes = cfg.audio_channels if modality == "audio" else 3
    if cfg.encoder == "resnet18":
        return ResNet18Trunk(planes)
    return CNN8(planes, first_stride=2 if modality == "audio" else cfg.visual_stride)


def pool_audio(fmap: torch.Tensor, how: str) -> torch.Tensor:
    """Audio feature map (B, C, f, t) -> (B, C) by ``CIGNConfig.audio_pool`` (``AudioEncoder``)."""
    if how == "mean":
        return fmap.mean(dim=(2, 3))
    over_time = fmap.mean(dim=2)  # (B, C, t)
    return over_time.amax(dim=2) + over_time.mean(dim=2)


class AudioEncoder(nn.Module):
    """Normalised log spectrogram -> global audio feature f_a (eq 1's input).

    ``cfg.audio_pool``: ``mean`` averages the feature map (the paper's ResNet18 pooling);
    ``time_max_mean`` averages over frequency, then adds the max and the mean over time (as in
    PANNs' audio-tagging CNNs), so a short word is not diluted by the seconds of noise around it.
    The ``cpu`` preset's choice, on avdigits' val split (cnn8 audio encoder + linear classifier, all
    10 classes, 8 epochs, AdamW 1e-3, 2-core Xeon, bf16, seeds 1-3): mean 79.2 +- 2.5 %,
    time_max_mean 84.5 +- 0.0 %.
    """

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        self.backbone = backbone(cfg, "audio")
        self.proj = nn.Linear(self.backbone.out_channels, cfg.dim)
        self.pool = cfg.audio_pool

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, F, T), or (B, C, F, T) when cfg.audio_channels > 1 -> f_a (B, D)."""
        if spec.dim() == 3:
            spec = spec.unsqueeze(1)  # (B, 1, F, T)
        return self.proj(pool_audio(self.backbone(spec), self.pool))  # (B, D)


class VisualEncoder(nn.Module):
    """Normalised RGB frame -> spatial visual features {f_v,p} (eq 2's input), P = h * w locations."""

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        self.backbone = backbone(cfg, "visual")
        self.proj = nn.Linear(self.backbone.out_channels, cfg.dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> f_v (B, P, D); P = 49 at 224 x 224 with ResNet18, 64 at 64 x 64 with cnn8."""
        fmap = self.backbone(frames)  # (B, C, h, w)
        return self.proj(fmap.flatten(2).transpose(1, 2))  # (B, h*w, C) -> (B, P, D)


class LoadReport(NamedTuple):
    path: str
    layout: str  # "torchvision", "audio/visual" or "audnet/imgnet"
    n_audio: int  # tensors loaded into the audio backbone
    n_visual: int  # tensors loaded into the visual backbone
    ignored: tuple[str, ...]  # checkpoint keys left unused (classifier, projection heads, ...)


def _unwrap(sd: dict, prefix: str = "") -> dict:
    """Keys under `prefix`, with it and a DDP `module.` wrapper prefix removed."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _split_layout(sd: dict, audio_planes: int) -> tuple[str, dict, dict, list[str]] | None:
    """Checkpoint dict -> (layout, audio state dict, visual state dict, ignored keys), None if unknown."""
    sd = _unwrap(sd["model"] if isinstance(sd.get("model"), dict) else sd)
    if isinstance(sd.get("audio"), dict) and isinstance(sd.get("visual"), dict):
        ignored = [k for k in sd if k not in ("audio", "visual")]
        return "audio/visual", _unwrap(sd["audio"]), _unwrap(sd["visual"]), ignored
    if any(k.startswith(("audnet.", "imgnet.")) for k in sd):
        ignored = [k for k in sd if not k.startswith(("audnet.", "imgnet."))]
        return "audnet/imgnet", _unwrap(sd, "audnet."), _unwrap(sd, "imgnet."), ignored
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        rgb = sd["conv1.weight"]  # (64, 3, 7, 7)
        audio = sd | {"conv1.weight": rgb.mean(dim=1, keepdim=True).repeat(1, audio_planes, 1, 1)}
        return "torchvision", audio, sd, []
    return None


def _check(backbone: nn.Module, sd: dict, where: str) -> tuple[dict, list[str]]:
    """Keep the backbone's keys of `sd`; raise on missing, mis-shaped or foreign keys."""
    own = backbone.state_dict()
    optional = [k for k in own if k.endswith("num_batches_tracked")]  # absent from legacy checkpoints
    missing = [k for k in own if k not in sd and k not in optional]
    if missing:
        raise ValueError(f"{where}: missing backbone keys {missing[:5]}")
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{where}: shape mismatch {shapes[:5]}")
    foreign = [k for k in sd if k not in own and not k.startswith("fc.")]
    if foreign:  # e.g. a deeper ResNet whose first blocks would otherwise load silently
        raise ValueError(f"{where}: keys not in the {type(backbone).__name__} backbone {foreign[:5]}")
    return {k: v for k, v in sd.items() if k in own}, [k for k in sd if k not in own]


def load_encoder_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint into `model.audio_encoder.backbone` and `model.visual_encoder.backbone`.

    Accepted layouts: (a) a torchvision ResNet18 state dict (ImageNet; `fc.*` ignored) for the visual
    backbone, copied into the audio backbone with conv1 averaged over RGB (repeated to
    cfg.audio_channels planes); (b) audio and visual sub-state-dicts under keys `audio`/`visual`, or
    under the localisation checkpoints' prefixes `audnet.`/`imgnet.`, optionally nested under `model`
    and with a DDP `module.` prefix. Anything else raises a ValueError naming the file. The
    projections after the backbones keep their initialisation. Nothing is downloaded.
    """
    path = str(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(ckpt).__name__}")
    audio_net, visual_net = model.audio_encoder.backbone, model.visual_encoder.backbone
    split = _split_layout(ckpt, model.cfg.audio_channels)
    if split is None:
        raise ValueError(f"{path}: unrecognised checkpoint layout, first keys {list(ckpt)[:5]}")
    layout, audio, visual, ignored = split
    audio, skip_a = _check(audio_net, audio, f"{path} (audio)")
    visual, skip_v = _check(visual_net, visual, f"{path} (visual)")
    audio_net.load_state_dict(audio, strict=False)  # only num_batches_tracked may be absent
    visual_net.load_state_dict(visual, strict=False)
    ignored = tuple(ignored) + tuple(f"audio:{k}" for k in skip_a) + tuple(f"visual:{k}" for k in skip_v)
    return LoadReport(path, layout, len(audio), len(visual), ignored)
