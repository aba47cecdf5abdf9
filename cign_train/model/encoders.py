"""ResNet18 audio and visual encoders (paper Sec. 4.1) and loading of local pretrained weights.

Both backbones are torchvision ``resnet18`` without its pooling and classifier, so their state
dicts use torchvision's key names and a torchvision or audio-visual localisation checkpoint
loads into them unchanged.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torchvision.models import ResNet, resnet18

from cign_train.config import CIGNConfig

TRUNK_DIM = 512  # channels of ResNet18's layer4


def resnet18_trunk(in_channels: int) -> ResNet:
    """torchvision ResNet18 (random init) taking `in_channels` planes, without avgpool and fc."""
    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    del net.avgpool, net.fc
    return net


def trunk_map(net: ResNet, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> layer4 feature map (B, 512, H/32, W/32), rounded up."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class AudioEncoder(nn.Module):
    """Normalised log spectrogram -> global audio feature f_a (eq 1's input)."""

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        self.backbone = resnet18_trunk(cfg.audio_channels)
        self.proj = nn.Linear(TRUNK_DIM, cfg.dim)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, F, T), or (B, C, F, T) when cfg.audio_channels > 1 -> f_a (B, D)."""
        if spec.dim() == 3:
            spec = spec.unsqueeze(1)  # (B, 1, F, T)
        fmap = trunk_map(self.backbone, spec)  # (B, 512, f, t)
        return self.proj(fmap.mean(dim=(2, 3)))  # (B, D)


class VisualEncoder(nn.Module):
    """Normalised RGB frame -> spatial visual features {f_v,p} (eq 2's input), P = h * w locations."""

    def __init__(self, cfg: CIGNConfig):
        super().__init__()
        self.backbone = resnet18_trunk(3)
        self.proj = nn.Linear(TRUNK_DIM, cfg.dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> f_v (B, P, D); P = 49 at 224 x 224."""
        fmap = trunk_map(self.backbone, frames)  # (B, 512, h, w)
        return self.proj(fmap.flatten(2).transpose(1, 2))  # (B, h*w, 512) -> (B, P, D)


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
        raise ValueError(f"{where}: keys not in ResNet18 {foreign[:5]}")
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
    split = _split_layout(ckpt, audio_net.conv1.in_channels)
    if split is None:
        raise ValueError(f"{path}: unrecognised checkpoint layout, first keys {list(ckpt)[:5]}")
    layout, audio, visual, ignored = split
    audio, skip_a = _check(audio_net, audio, f"{path} (audio)")
    visual, skip_v = _check(visual_net, visual, f"{path} (visual)")
    audio_net.load_state_dict(audio, strict=False)  # only num_batches_tracked may be absent
    visual_net.load_state_dict(visual, strict=False)
    ignored = tuple(ignored) + tuple(f"audio:{k}" for k in skip_a) + tuple(f"visual:{k}" for k in skip_v)
    return LoadReport(path, layout, len(audio), len(visual), ignored)
