"""How much each loss term pulls on the network, for the per-step logs: CIGN's diagnostics.

``grad_ratios`` compares the gradient norm each term puts on the shared body (encoders, phi_a /
phi_v, grouping: what every term can reach) with the grouping BCE's: a term at 1e-3 of BCE's pull
is inert whatever its value. One extra backward pass per term, so the trainer calls it on the
first step of the first and last epoch of each task only. ``StepLog`` writes every step's loss
terms and diagnostics to the run's ``steps.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

#: Modules of ``CIGN`` every term reaches: the heads, the token table and its classifier are not shared.
SHARED = ("audio_encoder", "visual_encoder", "phi_a", "phi_v", "group_a", "group_v")


def shared_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for name in SHARED for p in getattr(model, name).parameters() if p.requires_grad]


def grad_ratios(losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
                reference: str = "bce") -> dict[str, float]:
    """{``diag/grad_ratio_<term>``: ||d term / d params|| / ||d reference / d params||} for every loss term
    with a graph but the reference and ``total`` (the graph is kept for the step's own backward); empty
    when the method has no ``reference`` term."""
    def norm(loss: torch.Tensor) -> float:
        grads = [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if g is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0

    if reference not in losses:
        return {}
    ref = norm(losses[reference])
    terms = [k for k in losses if k not in (reference, "total") and not k.startswith("diag/")]
    return {f"diag/grad_ratio_{t}": norm(losses[t]) / ref for t in terms if losses[t].requires_grad and ref > 0}


class StepLog:
    """``steps.jsonl`` in the run folder: one JSON object per optimizer step (``task``, ``epoch``,
    ``step``, ``global_step``, ``lr``, every loss term and ``diag/*`` value of that step) and one per
    task end (``event`` ``task_end``, with the task-end diagnostics). The KL of eq 8 at a task's first
    step is the ``kl`` of its record with ``epoch`` 0 and ``step`` 0. ``resume`` = (task, global step)
    where a resumed run continues: records of that task from that step on (an interrupted epoch's)
    and of later tasks are dropped, so each step appears once (the TensorBoard curves purge alike)."""

    def __init__(self, path: Path, resume: tuple[int, int] | None = None):
        self.path = Path(path)
        kept = []
        if resume is not None and self.path.is_file():
            task, step = resume
            kept = [line for line in self.path.read_text().splitlines() if line and self._before(json.loads(line), task, step)]
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.file = self.path.open("a")

    @staticmethod
    def _before(record: dict, task: int, step: int) -> bool:
        return record["task"] < task or (record["task"] == task and "event" not in record
                                         and record["global_step"] < step)

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
