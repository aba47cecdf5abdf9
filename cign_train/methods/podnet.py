"""PODNet (Douillard et al., ECCV 2020, "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental
Learning"): rehearsal plus Pooled Outputs Distillation (Sec. 3.1) of the frozen previous model's
intermediate feature maps (POD-spatial) and final embeddings (POD-flat)."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from cign_train.methods.base import Inputs, Option, Task, TaskData
from cign_train.methods.finetune import Finetune
from cign_train.model import CIGN
from cign_train.model.encoders import CNN8, ResNet18Trunk

T = TypeVar("T")


def stages(backbone: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the backbone's stage feature maps h_l (B, C_l, H_l, W_l), in order:
    ResNet18's layer1-4 (PODNet distils every stage's output; the authors' ResNets hand over layer1-4's);
    cnn8's four stages' last conv-BN-ReLU (the one before each max pool, and the final one)."""
    if isinstance(backbone, ResNet18Trunk):
        return [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if isinstance(backbone, CNN8):
        layers = list(backbone)
        return [m for i, m in enumerate(layers) if i + 1 == len(layers) or isinstance(layers[i + 1], nn.MaxPool2d)]
    raise TypeError(f"podnet: no stages known for a {type(backbone).__name__} backbone")


def pooled(h: torch.Tensor) -> torch.Tensor:
    """Phi(h) = [POD-width || POD-height] of one stage's map (Sec. 3.1, L_POD-spatial): (B, C, H, W) ->
    (B, C (H + W)), fp32, L2-normalised per sample.

    For each channel, the sums over the width (one value per row, H of them) followed by the sums over
    the height (one per column, W of them); the C channels' vectors are concatenated before the
    normalisation (as the authors' implementation normalises), so it keeps how the channels' magnitudes
    compare. The activations are pooled as they are, as in the paper's equations (the authors'
    implementation squares them first).
    """
    h = h.float()
    width = h.sum(dim=3)  # (B, C, H): pooled over w
    height = h.sum(dim=2)  # (B, C, W): pooled over h
    return F.normalize(torch.cat([width, height], dim=2).flatten(1), dim=1)


def distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||student - teacher||_2 per sample, (B, N) each, batch mean; the teacher gets no gradient."""
    return torch.linalg.vector_norm(student - teacher.detach(), dim=1).mean()


def pod_spatial(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_POD-spatial summed over the stages l: sum_l ||Phi(h_l^t) - Phi(h_l^{t-1})||_2, batch mean, fp32
    (``pooled``). student[l] and teacher[l] are stage l's maps (B, C_l, H_l, W_l) of the current and the
    previous model on the same batch; the teacher's get no gradient."""
    return torch.stack([distance(pooled(s), pooled(t)) for s, t in zip(student, teacher, strict=True)]).sum()


def pod_flat(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_POD-flat between the final embeddings (B, D): 1 - cos(h^t, h^{t-1}), batch mean, fp32; the teacher
    gets no gradient. That is half the squared Euclidean distance of the L2-normalised embeddings; the
    authors' implementation computes it so (a cosine embedding loss), and lambda_f was set with it."""
    return (1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=1)).mean()


def adaptive_weight(task: Task) -> float:
    """sqrt(N_seen / N_new), N_seen the classes seen so far (this task's included) and N_new this task's:
    PODNet scales both POD terms by it (the authors' implementation: scheduled_factor * sqrt(n_classes /
    task_size)), after Hou et al.'s adaptive weight (UCIR, CVPR 2019), so the distillation weighs more as
    the old classes outnumber the new ones."""
    return math.sqrt((len(task.old_classes) + len(task.new_classes)) / len(task.new_classes))


class Recorded(NamedTuple):
    """What one pass through a model's encoders produced."""

    maps_a: list[torch.Tensor]  # the audio backbone's stage maps (``stages``)
    maps_v: list[torch.Tensor]  # the visual backbone's
    f_a: torch.Tensor  # (B, D) the audio encoder's output
    f_v: torch.Tensor  # (B, D) the visual encoder's (B, P, D), averaged over its P patches


def record(model: CIGN, run: Callable[[], T]) -> tuple[T, Recorded]:
    """Call ``run()``, a forward pass through ``model``'s encoders, with forward hooks on their backbones'
    stages and on the encoders; -> (run's result, what the hooks kept). The hooks are removed on
    return, also when ``run`` raises."""
    audio, visual = stages(model.audio_encoder.backbone), stages(model.visual_encoder.backbone)
    modules = [*audio, *visual, model.audio_encoder, model.visual_encoder]
    outputs: dict[int, torch.Tensor] = {}

    def keep(i: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[i] = output

    handles = [m.register_forward_hook(partial(keep, i)) for i, m in enumerate(modules)]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    *maps, f_a, f_v = (outputs[i] for i in range(len(modules)))
    return result, Recorded(maps[: len(audio)], maps[len(audio):], f_a, f_v.mean(dim=1))


class PODNet(Finetune):
    """L = L_finetune + sqrt(N_seen / N_new) * sum_{m in a, v} (lambda_c / L_m sum_l L_POD-spatial(h_m,l)
    + lambda_f L_POD-flat(f_m)), trained on the task's clips plus the rehearsal buffer.

    The distillation is the paper's L_POD-final (Sec. 3.1): POD-spatial (``pod_spatial``) on every stage
    map of each encoder's backbone (``stages``), its sum divided by the number L_m of those stages as
    L_POD-final divides it, and POD-flat (``pod_flat``) on the final embeddings: here the encoders'
    outputs, f_a and the visual encoder's patches averaged (the network part before the class tokens,
    as ``icarl`` reads it); each weighted by ``adaptive_weight``. Audio and visual terms are summed. The
    maps are read with forward hooks that live only for the step's forward passes. The teacher is the
    model before it grows, frozen, in eval mode; it runs only its encoders, all POD reads.

    Documented adaptation: PODNet's classifier and its loss, the local similarity classifier (several
    proxies per class) trained with the NCA loss (Sec. 3.2), are not used: every method compared here
    keeps this network's heads, so Finetune's terms (eq 8's BCE over every seen class and the new
    tokens' CE) stand for them and prediction is the heads'. Defaults are PODNet's CIFAR100 values,
    lambda_c = 3 and lambda_f = 1 (the authors' options/podnet/podnet_cnn_cifar100.yaml). Not done: the
    class-balanced fine-tuning of the classifier after each task (the authors' finetuning_config), as
    the heads are not PODNet's; the trainer's class-balanced batches of task clips and buffer remain.
    """

    NAME = "podnet"
    NEEDS_BUFFER = True
    OPTIONS = (
        Option("podnet_lambda_spatial", 3.0,
               "Weight lambda_c of POD-spatial (PODNet's CIFAR100 setting; 8 on ImageNet)."),
        Option("podnet_lambda_flat", 1.0,
               "Weight lambda_f of POD-flat (PODNet's CIFAR100 setting; 10 on ImageNet)."),
    )

    teacher: CIGN | None = None

    def begin_task(self, task: Task) -> None:
        """Freeze the previous task's model (none before the first task)."""
        self.teacher = None if task.index == 0 else copy.deepcopy(self.model).requires_grad_(False).eval()

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """Terms ``bce`` and ``ce`` (Finetune), ``pod_spatial`` and ``pod_flat`` (weighted) and ``total``."""
        if self.teacher is None:
            terms = self.terms(self.forward(batch.spectrograms, batch.frames), batch)
            zero = terms["bce"].new_zeros(())
            return {**terms, "pod_spatial": zero, "pod_flat": zero}
        out, new = record(self.model, lambda: self.forward(batch.spectrograms, batch.frames))
        teacher = self.teacher
        with torch.no_grad():
            _, old = record(teacher, lambda: (teacher.audio_encoder(batch.spectrograms),
                                              teacher.visual_encoder(batch.frames)))
        terms = self.terms(out, batch)
        weight = adaptive_weight(self.task)
        spatial = (pod_spatial(new.maps_a, old.maps_a) / len(new.maps_a)
                   + pod_spatial(new.maps_v, old.maps_v) / len(new.maps_v))
        flat = pod_flat(new.f_a, old.f_a) + pod_flat(new.f_v, old.f_v)
        spatial = weight * self.options["podnet_lambda_spatial"] * spatial
        flat = weight * self.options["podnet_lambda_flat"] * flat
        return {**terms, "pod_spatial": spatial, "pod_flat": flat, "total": terms["total"] + spatial + flat}

    def end_task(self, task: Task, data: TaskData) -> None:
        """Drop the teacher; the next task freezes a fresh one."""
        self.teacher = None
