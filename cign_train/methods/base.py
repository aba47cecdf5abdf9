"""The continual-learning method interface the trainer drives (Mammoth's begin_task/observe/end_task).

The trainer owns everything methods share: growing the class-token table, optimizers, AMP,
DDP, the rehearsal buffer, evaluation, checkpoints and logs. A method decides only what the
model learns from one batch, plus what it keeps between tasks. Per task the trainer calls

1. ``begin_task(task)``: the model is still the previous task's (not yet grown), so this is the
   moment to keep a frozen copy of it;
2. it grows the model by ``task.new_classes`` and trains: ``observe(batch)`` once per step,
   returning named loss terms whose ``total`` it back-propagates;
3. ``end_task(task, data)`` after the last epoch and the buffer update, before evaluation;
   ``data.clips()`` iterates over the task's training clips and ``data.exemplars()`` over the
   rehearsal buffer's (un-augmented batches), e.g. for EWC's Fisher or iCaRL's class means, and
   ``data.holdout()`` over the clips kept out of this task's training (``HOLDOUT``);
4. ``predict(batch)`` for evaluation.

A method declares its own settings as ``OPTIONS`` (``cign-train --method NAME --help`` lists them;
their values reach it as ``self.options``), the ``cign-train`` options that set model-config fields
it reads as ``LOSS_OPTIONS``, whether it keeps a rehearsal buffer as ``NEEDS_BUFFER`` and the run
settings its paper fixes (e.g. how exemplars are chosen) as ``SETTINGS``; the command line refuses
an option that does not apply to the chosen method.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig
from cign_train.model import CIGN, Prediction, predict


class Task(NamedTuple):
    index: int
    old_classes: tuple[int, ...]  # model class indices seen in earlier tasks
    new_classes: tuple[int, ...]  # this task's classes (they follow the old ones)


class Inputs(NamedTuple):
    spectrograms: torch.Tensor  # (B, F, T) normalised
    frames: torch.Tensor  # (B, 3, H, W) normalised
    labels: torch.Tensor  # (B,) model class indices


class TaskData(NamedTuple):
    """What ``end_task`` may read, as un-augmented batches of Inputs (each call starts a new pass)."""

    clips: Callable[[], Iterable[Inputs]]  # the task's training clips
    exemplars: Callable[[], Iterable[Inputs]]  # the rehearsal buffer's, every seen class (empty without one)
    holdout: Callable[[], Iterable[Inputs]] = lambda: iter(())  # Method.HOLDOUT per seen class, not trained on


class Option(NamedTuple):
    """A setting of one method: ``cign-train --NAME`` (underscores as dashes), saved in the run's
    ``config.json`` under ``method_options``. Its type is the default's; ``help`` says where the
    default comes from (paper, section or equation)."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()


class Method:
    """Base class: subclasses set ``NAME`` and ``NEEDS_BUFFER`` and implement ``observe``."""

    NAME: ClassVar[str]
    NEEDS_BUFFER: ClassVar[bool]
    #: True: each task trains on every seen class's full training data (the joint upper bound),
    #: not only the new classes' (plus the buffer when ``NEEDS_BUFFER``).
    TRAINS_ON_SEEN: ClassVar[bool] = False
    #: The method's own settings.
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: ``cign-train`` options that set fields of the model config this method's losses read.
    LOSS_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: Clips per seen class withheld from each task's training (e.g. BiC's validation split; read after
    #: ``__init__``, so an option may set it): a seeded choice of each new class's training clips (not
    #: trained on, nor selected for the buffer) and of each old class's exemplars (they stay in the
    #: buffer, so a method with a HOLDOUT needs one); ``end_task`` reads them as ``data.holdout()``.
    HOLDOUT: ClassVar[int] = 0
    #: Run settings whose default this method's paper fixes otherwise (e.g. iCaRL's herding exemplars):
    #: ``preset_settings`` applies them under the values given, so ``cign-train --method NAME`` follows the paper.
    SETTINGS: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: CIGN, cfg: CIGNConfig, options: dict[str, Any] | None = None):
        for attr in ("NAME", "NEEDS_BUFFER"):
            if not hasattr(type(self), attr):
                raise TypeError(f"{type(self).__name__} must define {attr}")
        self.model = model  # the bare module: token table, teacher copies
        self.forward: nn.Module = model  # what to call for outputs (the DDP wrapper when distributed)
        self.cfg = cfg
        self.options = self.resolve_options(options or {})
        self.task: Task | None = None

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Every option of the method: ``given`` values (checked) over the defaults; a ValueError names
        an unknown option or a bad value."""
        known = {o.name: o for o in cls.OPTIONS}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"method {cls.NAME!r} has no option(s) {unknown}; its options: {sorted(known) or 'none'}")
        values = {}
        for o in cls.OPTIONS:
            value = given.get(o.name, o.default)
            try:
                value = type(o.default)(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"method {cls.NAME!r}: option {o.name} = {value!r} is not a {type(o.default).__name__}") from e
            if o.choices and value not in o.choices:
                raise ValueError(f"method {cls.NAME!r}: option {o.name} must be one of {o.choices}, got {value!r}")
            values[o.name] = value
        return values

    def begin_task(self, task: Task) -> None:
        """Called before the model grows by ``task.new_classes``; the default keeps nothing."""

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement observe")

    def predict(self, batch: Inputs) -> Prediction:
        """Class probabilities p_a, p_v, p_av for evaluation (the model is in eval mode): the heads'
        sigmoids and their product (Sec. 3.3) by default."""
        return predict(self.model(batch.spectrograms, batch.frames))

    @classmethod
    def predicts_with_heads(cls) -> bool:
        """Whether ``predict`` is the network's own (heads' sigmoids, p_av = p_a * p_v), so that the
        exported network classifies as the method does (no class means, calibration or prompts)."""
        return cls.predict is Method.predict

    def diagnose(self, batch: Inputs) -> dict[str, torch.Tensor]:
        """Task-end diagnostics on a batch of rehearsal exemplars (old classes), called before
        ``end_task``; each value is a batch mean, logged as is. The default has none."""
        return {}

    def parameters(self) -> list[nn.Parameter]:
        """The method's own trainable parameters, outside the model (e.g. L2P's prompts): the trainer adds
        them to each task's optimizer, built after ``begin_task`` and the grow. The model's state_dict
        (what exports read) does not hold them, so a method keeps them in ``state_dict``; under DDP
        the trainer averages their gradients across processes (``distributed.average_gradients``), as
        DDP does the model's. The default: none."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps between tasks beyond the model and the buffer (tensors and plain
        values), saved in each task checkpoint so that a resume continues it; the default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s value (a resume)."""

    def end_task(self, task: Task, data: TaskData) -> None:
        """Called after the task's last epoch and the buffer update; the default keeps nothing."""
