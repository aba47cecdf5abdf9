"""Training-time augmentation of a batch (``--augment``; on in the ``cpu`` preset, off in ``paper``).

Not part of the paper, whose encoders start from audio-visual pretraining. Trained from scratch
on avdigits' 320 clips per task, both ResNet18s memorise the training clips within ~100 steps
(98-100 % train accuracy) while staying near chance on held-out digits and voices; these
perturbations keep the label and break the shortcuts (clip colours, positions, word timing).

- frames, per sample (torchvision ``transforms.v2``): a random resized crop (scale 0.5-1, aspect
  3/4-4/3) back to the spec's size, and colour jitter (brightness, contrast, saturation 0.4, hue
  0.1). No flips: digits are not mirror-symmetric.
- spectrograms, per sample: a circular time shift of up to a quarter of the window (the word moves
  within the 3 s window), then ``RandomErasing`` of one time-frequency rectangle with 0 (the
  normalised mean) half of the time, in the spirit of SpecAugment's masks.

Randomness comes from torch's global generator, so a seeded run stays reproducible.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from cign_runtime.spec import PreprocessSpec


class Augment:
    def __init__(self, spec: PreprocessSpec):
        self.frame_tf = v2.Compose([
            v2.RandomResizedCrop(spec.frame_size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
        ])
        self.erase = v2.RandomErasing(p=0.5, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0.0)
        self.max_shift = spec.n_time // 4

    def frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> uint8 (B, H, W, 3), each frame with its own crop and jitter."""
        chw = frames.permute(0, 3, 1, 2)  # (B, 3, H, W)
        return torch.stack([self.frame_tf(img) for img in chw]).permute(0, 2, 3, 1)

    def spectrograms(self, spectrograms: torch.Tensor) -> torch.Tensor:
        """Normalised (B, F, T) -> (B, F, T): per-sample circular time shift, then random erasing."""
        b, f, t = spectrograms.shape
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (b, 1), device=spectrograms.device)
        src = (torch.arange(t, device=spectrograms.device) - shift) % t  # (B, T): output column <- input column
        shifted = spectrograms.gather(-1, src.unsqueeze(1).expand(b, f, t))
        return torch.stack([self.erase(s.unsqueeze(0)).squeeze(0) for s in shifted])
