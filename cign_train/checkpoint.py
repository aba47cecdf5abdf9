"""Self-describing checkpoints (``task_{t}.pt``) and the mid-task resume state (``last.pt``).

Contents are plain dicts, lists, numbers, strings and tensors, so ``torch.load(weights_only=True)``
reads them: weights, the model config, the preprocessing spec, class names in task order, classes
per task, the token table, the run settings, the buffer and the evaluation so far.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "cign-checkpoint"
VERSION = 1


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT or ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
    return ckpt


def task_path(run_dir: Path, task: int) -> Path:
    return run_dir / f"task_{task}.pt"


def last_finished_task(run_dir: Path, tasks: int) -> int:
    """Index of the last task with a checkpoint (tasks are finished in order), -1 if none."""
    done = -1
    while done + 1 < tasks and task_path(run_dir, done + 1).is_file():
        done += 1
    return done
