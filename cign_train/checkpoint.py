"""The checkpoint contract: ``task_{t}.pt`` (what the trainer writes and export reads) and ``last.pt``.

A task checkpoint is self-describing (``../DESIGN.md``): the weights, the :class:`CIGNConfig` that
built the model, the preprocessing spec, the class names in task order, the classes per task, the
token table, the run settings, the buffer, what the method keeps between tasks (EWC's Fisher) and
the evaluation so far. :class:`TaskCheckpoint` is
its one definition; on disk it is a dict of plain values and tensors, so
``torch.load(weights_only=True)`` reads it, and :meth:`TaskCheckpoint.build_model` rebuilds the
model without the trainer (as nanoGPT's ``model_args``).

No checkpoint holds a non-finite weight, BatchNorm statistic, token or method tensor: such a model
predicts chance (a NaN in one convolution spreads to every output), so :class:`TaskCheckpoint` refuses
one when it is built, whether to be saved or after it was loaded, naming the tensors
(:class:`NonFiniteCheckpoint`), and the trainer checks ``last.pt``'s alike.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cign_runtime.spec import PreprocessSpec
from cign_train.config import CIGNConfig

FORMAT = "cign-checkpoint"
VERSION = 1


class NonFiniteCheckpoint(ValueError):
    """A checkpoint's tensors hold NaN or inf; the message names them."""


def nonfinite(tensors: Any, name: str = "") -> list[str]:
    """``"name (n of m entries)"`` for every floating-point tensor in ``tensors`` (a tensor, or dicts and
    lists of them, named by their keys joined with dots) that holds a NaN or inf."""
    if isinstance(tensors, torch.Tensor):
        if not tensors.is_floating_point():
            return []
        bad = int((~torch.isfinite(tensors)).sum())
        return [f"{name} ({bad} of {tensors.numel()} entries)"] if bad else []
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors) if isinstance(tensors, (list, tuple)) else ()
    return [entry for key, value in items for entry in nonfinite(value, f"{name}.{key}" if name else str(key))]


def check_finite(**parts: Any) -> None:
    """A :class:`NonFiniteCheckpoint` naming every tensor of ``parts`` (e.g. model=state_dict) that is not finite."""
    bad = [entry for part, tensors in parts.items() for entry in nonfinite(tensors, part)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteCheckpoint(f"non-finite values in {shown}: a model with them is refused (not saved, "
                                  "loaded or exported)")


@dataclass
class TaskCheckpoint:
    """The model after task ``task`` (0-based) and everything needed to use or continue it."""

    task: int
    model: dict[str, torch.Tensor]  # state dict of cign_train.model.CIGN
    config: CIGNConfig
    spec: PreprocessSpec
    classes: list[str]  # model class k's name, in task order (K = len(classes))
    classes_per_task: list[int]  # len == task + 1, sums to K
    tokens: torch.Tensor  # (K, D) the class-token table (also in ``model``; kept for readers without torch models)
    method: str
    settings: dict[str, Any]  # cign_train.settings.TrainSettings.to_dict()
    buffer: dict[str, Any]  # cign_train.buffer.RehearsalBuffer.state_dict()
    evaluation: dict[str, Any]  # rows, seen, eval_clips, global_step so far (cign_train.reporting)
    world_size: int = 1
    method_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # Method.state_dict()

    def __post_init__(self) -> None:
        k = len(self.classes)
        if len(self.classes_per_task) != self.task + 1 or sum(self.classes_per_task) != k:
            raise ValueError(f"classes_per_task {self.classes_per_task} does not fit task {self.task} with {k} classes")
        if tuple(self.tokens.shape) != (k, self.config.dim):
            raise ValueError(f"token table {tuple(self.tokens.shape)} does not fit {k} classes x D {self.config.dim}")
        check_finite(model=self.model, tokens=self.tokens, method_state=self.method_state)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format": FORMAT, "version": VERSION, **d, "config": self.config.to_dict(), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskCheckpoint":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d) - {"world_size", "method_state"})
        if missing:
            raise ValueError(f"task checkpoint lacks {missing}")
        values = {k: d[k] for k in names if k in d}
        values["config"] = CIGNConfig.from_dict(d["config"])
        values["spec"] = PreprocessSpec.from_dict(d["spec"])
        return cls(**values)

    def save(self, path: Path) -> None:
        save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> "TaskCheckpoint":
        try:
            return cls.from_dict(load(path))
        except NonFiniteCheckpoint as e:
            raise NonFiniteCheckpoint(f"{path}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def build_model(self):
        """A ``CIGN`` in eval mode with this checkpoint's config, K classes and weights."""
        from cign_train.model import CIGN

        model = CIGN(self.config, len(self.classes))
        model.load_state_dict(self.model)
        return model.eval()


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """A checkpoint file's dict (task or ``last.pt``), checked for format and version."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
    return ckpt


def task_path(run_dir: Path, task: int) -> Path:
    return run_dir / f"task_{task}.pt"


def check_spec(path: Path, trained: PreprocessSpec, store: PreprocessSpec) -> None:
    """A ValueError naming checkpoint ``path`` and the fields that differ when the spec its model was
    trained on is not the store's (the store was prepared again with a changed preset): its weights do
    not fit the store's inputs, so the run can be neither continued nor re-scored on it."""
    if trained != store:
        was, now = trained.to_dict(), store.to_dict()
        changed = ", ".join(f"{k} {was[k]} -> {now[k]}" for k in was if was[k] != now.get(k))
        raise ValueError(f"{path}: trained on another preprocessing spec than the store's ({changed}); "
                         "start a new run (another --out, or --runs for cign-experiment)")


def last_finished_task(run_dir: Path, tasks: int | None = None) -> int:
    """Index of the last task with a checkpoint (tasks are finished in order), -1 if none."""
    done = -1
    while (tasks is None or done + 1 < tasks) and task_path(run_dir, done + 1).is_file():
        done += 1
    return done
