"""The class-incremental procedure: for each task, grow, train (task data + buffer), update the
buffer, evaluate every seen task, checkpoint. The loop talks to a method only through
``begin_task`` / ``observe`` / ``end_task`` (``cign_train.methods.base``), and reads a prepared store
that the commands made sure of (``cign_train.data.ingest``): training never generates or prepares data.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cign_train import checkpoint as ck
from cign_train import distributed as D
from cign_train import precision
from cign_train.augment import Augment
from cign_train.buffer import RehearsalBuffer
from cign_train.data.definitions import DatasetDefinition, get_definition
from cign_train.data.ingest import store_dir
from cign_train.data.loader import Batch, batch_loader, batches_per_epoch
from cign_train.data.store import PreparedStore
from cign_train.diagnostics import StepLog, grad_ratios, shared_parameters
from cign_train.evaluate import MODALITIES, evaluate_tasks
from cign_train.guard import ACTIONS, StepGuard
from cign_train.methods import Inputs, Method, Task, TaskData, get_method
from cign_train.metrics import collapses
from cign_train.model import CIGN, load_encoder_weights
from cign_train.preprocess import stored_inputs
from cign_train.reporting import metrics_document, write_metrics
from cign_train.schedule import task_scheduler
from cign_train.settings import TrainSettings


#: Steps timed (after the first, which allocates) before a CPU run says how long it will take.
TIMED_STEPS = 3


def cpu_estimate(s: TrainSettings, steps_left: int, seconds_per_step: float) -> str:
    """The line a CPU run prints after its first steps: how long the rest will take, and, for the paper preset
    (ResNet18 at 224 px, made for GPUs), the cpu preset as the alternative."""
    minutes = steps_left * seconds_per_step / 60
    took = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
    line = (f"on the CPU: {seconds_per_step:.2f} s a step over the first {TIMED_STEPS}; this run's {steps_left} steps "
            f"left take {took} of training or more (a later task's step also runs its teacher; evaluations aside)")
    if s.spec == "paper":
        line += ("; the paper preset (ResNet18 at 224 px) is made for GPUs (--device cuda): on a CPU, --preset cpu "
                 "(cnn8 at 64 px, on a store prepared with cign-prepare --preset cpu) trains in minutes")
    return line


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the message names task, epoch and step."""


@dataclass
class Plan:
    """The data side of a run: the store and which store samples and classes each task uses."""

    store: PreparedStore
    order: list[int]  # store class index of model class k
    task_classes: list[list[int]]  # model class indices per task
    label_map: np.ndarray  # store class index -> model class index (-1: not in the run)

    @property
    def class_names(self) -> list[str]:
        return [self.store.classes[i] for i in self.order]

    def split_indices(self, split: str, model_classes) -> np.ndarray:
        store_classes = [self.order[k] for k in model_classes]
        return self.store.indices(split, store_classes)


def make_plan(s: TrainSettings) -> Plan:
    """Open the prepared store and lay the classes out in tasks."""
    store = PreparedStore(store_dir(Path(s.data_dir), s.store_name, s.spec))
    n = len(store.classes)
    if s.class_order == "seeded":
        order = [int(i) for i in np.random.default_rng(s.seed).permutation(n)]
    else:
        order = list(range(n))
    label_map = np.full(n, -1, dtype=np.int64)
    label_map[order] = np.arange(n)
    # Model class k is the k-th of the run's order, so the definition's blocks are the tasks. A csv
    # store is its own definition: its classes in the order cign-prepare stored them (--classes).
    definition = (DatasetDefinition(s.name, tuple(store.classes), s.tasks, s.spec) if s.dataset == "csv"
                  else get_definition(s.dataset))
    return Plan(store, order, definition.task_classes(s.tasks), label_map)


def train_indices(plan: Plan, classes, max_per_class: int | None, seed: int) -> np.ndarray:
    """The task's training samples, at most ``max_per_class`` per class (a seeded choice)."""
    idx = plan.split_indices("train", classes)
    if max_per_class is None:
        return idx
    keep = []
    for k in classes:
        mine = idx[plan.label_map[plan.store.labels[idx]] == k]
        if len(mine) > max_per_class:
            mine = np.sort(np.random.default_rng([seed, k]).choice(mine, max_per_class, replace=False))
        keep.append(mine)
    return np.sort(np.concatenate(keep))


def withheld(plan: Plan, idx: np.ndarray, classes, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` of each class's clips among ``idx`` (a seeded choice, a stream apart from
    train_indices'), sorted: what a method's HOLDOUT keeps out of a task's training."""
    labels = plan.label_map[plan.store.labels[idx]]
    held = [np.zeros(0, dtype=np.int64)]
    for k in classes:
        mine = np.sort(idx[labels == k])
        if len(mine) <= per_class:
            raise ValueError(f"withholding {per_class} clips of class {k} leaves none of its {len(mine)} to train on")
        held.append(np.random.default_rng([seed, k, 1]).choice(mine, per_class, replace=False))
    return np.sort(np.concatenate(held))


def param_groups(model: CIGN, method: Method, s: TrainSettings) -> list[dict]:
    """The trainable parameters as Adam groups: the audio / visual encoder at ``s.audio_encoder_lr`` /
    ``s.visual_encoder_lr`` where given, everything else (class tokens, phi, grouping, heads, the method's
    own parameters) at ``s.lr``: one group per rate, ``s.lr``'s last; the schedule scales them all alike."""
    own = {id(p): lr for enc, lr in ((model.audio_encoder, s.audio_encoder_lr), (model.visual_encoder, s.visual_encoder_lr))
           if lr is not None for p in enc.parameters()}
    trainable = [p for p in (*model.parameters(), *method.parameters()) if p.requires_grad]
    rates = [*dict.fromkeys(lr for lr in own.values() if lr != s.lr), s.lr]
    groups = [{"params": [p for p in trainable if own.get(id(p), s.lr) == lr], "lr": lr} for lr in rates]
    return [g for g in groups if g["params"]]


class Trainer:
    def __init__(self, settings: TrainSettings, run_dir: Path, progress: bool = True):
        self.s = settings
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.dist = D.setup(settings.device)
        self.plan = make_plan(settings)
        self.spec = self.plan.store.spec
        self.buffer = RehearsalBuffer(settings.buffer_per_class, settings.buffer_select, settings.seed)
        self.rows: dict[str, list[list[float]]] = {m: [] for m in MODALITIES}
        self.seen: dict[str, list[float]] = {m: [] for m in MODALITIES}
        self.eval_clips: list[int] = []
        self.guarded: dict[str, list[int]] = {a: [] for a in ACTIONS}  # per task: steps the guard redid / skipped
        self.global_step = 0  # optimizer steps over all tasks: the x axis of the TensorBoard losses
        self.writer: SummaryWriter | None = None
        self.steplog: StepLog | None = None
        self.amp_dtype = precision.autocast_dtype(settings.amp, self.dist.device)
        self.timing: float | None = None  # when a CPU run's timed steps began (0: not yet); None: nothing to time
        self.augment = Augment(self.spec) if settings.augment else None

    # ----------------------------------------------------------------------------------- inputs
    def inputs(self, batch: Batch, augment: bool = False) -> Inputs:
        """A loader batch on the device, normalised; ``augment`` applies the run's augmentation."""
        spectrograms, frames = stored_inputs(self.spec, batch.frames, batch.spectrograms, self.dist.device,
                                             self.augment if augment else None)
        labels = torch.from_numpy(self.plan.label_map[batch.labels.numpy()]).to(self.dist.device)
        return Inputs(spectrograms, frames, labels)

    def autocast(self):
        return precision.autocast(self.dist.device, self.amp_dtype)

    # ------------------------------------------------------------------------------- lifecycle
    def build_model(self, n_classes: int) -> CIGN:
        torch.manual_seed(self.s.seed)
        model = CIGN(self.s.model, n_classes)
        if self.s.encoder_weights:
            load_encoder_weights(model, self.s.encoder_weights)
        return model.to(self.dist.device, memory_format=torch.channels_last)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train every task, or with ``resume`` the ones the run in ``run_dir`` has not finished;
        ``stop_after`` T stops once task T is checkpointed (a later ``resume`` goes on from there).

        A resume continues from the last finished task and the epochs of the next one saved in
        ``last.pt``; the settings must be the run's (``config.json``, up to the operational ones).
        Without ``resume`` the folder must not hold a run: no ``task_*.pt`` and no ``last.pt``.
        """
        s, plan = self.s, self.plan
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        if resume:
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path}: nothing to resume in {self.run_dir}")
            saved = TrainSettings.from_dict(json.loads(config_path.read_text()))
            if saved.results_settings() != s.results_settings():
                raise ValueError(f"{config_path}: the run was started with other settings; resume it with those")
        else:
            if any(self.run_dir.glob("task_*.pt")) or (self.run_dir / "last.pt").exists():
                raise FileExistsError(f"{self.run_dir} holds a run already; pass --resume or pick another --out")
            if self.dist.main:
                config_path.write_text(json.dumps(s.to_dict(), indent=1))

        n_tasks = len(plan.task_classes)
        done = ck.last_finished_task(self.run_dir, n_tasks) if resume else -1
        method_cls = get_method(s.method)
        if done >= 0:
            path = ck.task_path(self.run_dir, done)
            saved = ck.TaskCheckpoint.load(path)
            ck.check_spec(path, saved.spec, self.spec)
            model = self.build_model(len(saved.classes))
            model.load_state_dict(saved.model)
            self.buffer.load_state_dict(saved.buffer)
            ev = saved.evaluation
            self.rows, self.seen, self.eval_clips = ev["rows"], ev["seen"], ev["eval_clips"]
            self.guarded = ev["guarded"]
            self.global_step = int(ev.get("global_step", 0))
        else:
            model = self.build_model(len(plan.task_classes[0]))
        method: Method = method_cls(model, s.model, s.method_options)
        self.timing = 0.0  # the first epoch of this process's training says how long the run will take
        if method.HOLDOUT >= s.buffer_per_class:
            raise ValueError(f"method {s.method!r} withholds {method.HOLDOUT} clips per class, which leaves an old "
                             f"class none of its {s.buffer_per_class} exemplars (--buffer-per-class) to train on")
        if done >= 0:
            method.load_state_dict(saved.method_state)
        if resume and done == n_tasks - 1 and self.dist.main:
            tqdm.write(f"resuming {self.run_dir}: all {n_tasks} tasks are done already; reporting its results, "
                       "not training again")
        last = n_tasks - 1 if stop_after is None else min(stop_after, n_tasks - 1)
        for t in range(done + 1, last + 1):
            self.train_task(method, model, t, resume=resume and t == done + 1)
        D.barrier(self.dist)
        summary = self.write_metrics() if self.dist.main else {}
        if self.writer is not None:
            self.writer.close()
            self.steplog.close()
        D.teardown(self.dist)
        return summary

    def rescore(self, split: str) -> dict:
        """The finished tasks of the run in ``run_dir`` scored on ``split`` from their checkpoints, as
        metrics.json's content; the run is left unchanged. Choose settings on val, then report test
        from the same trained models without training again."""
        n_tasks = ck.last_finished_task(self.run_dir, len(self.plan.task_classes)) + 1
        if n_tasks == 0:
            raise FileNotFoundError(f"{self.run_dir}: no finished task to score")
        rows: dict[str, list[list[float]]] = {m: [] for m in MODALITIES}
        seen: dict[str, list[float]] = {m: [] for m in MODALITIES}
        acc = None
        for t in range(n_tasks):
            saved = ck.TaskCheckpoint.load(ck.task_path(self.run_dir, t))
            model = saved.build_model().to(self.dist.device, memory_format=torch.channels_last)
            method = get_method(self.s.method)(model, self.s.model, self.s.method_options)
            method.task = self.task(t)
            method.load_state_dict(saved.method_state)
            acc = evaluate_tasks(method, self.plan, t, self.inputs, self.autocast, self.s.batch_size, self.s.workers,
                                 self.dist, split)
            acc.append_to(rows, seen)
        return metrics_document(rows, seen, acc.eval_clips, split, self.classes_seen(), saved.evaluation["guarded"])

    def classes_seen(self) -> list[int]:
        """Number of classes seen after each task."""
        return np.cumsum([len(c) for c in self.plan.task_classes]).tolist()

    def write_metrics(self) -> dict:
        return write_metrics(self.run_dir, self.rows, self.seen, self.eval_clips, self.s.eval_split, self.classes_seen(),
                             self.guarded)

    def open_writer(self, t: int, resume: bool) -> None:
        """TensorBoard event files in ``run_dir/tensorboard``: every loss term per optimizer step
        (``loss/*``), the ``diag/*`` diagnostics, and per task t the seen-class accuracy
        (``accuracy_seen/<modality>``) and each task's (``accuracy_task<i>/<modality>``); the same
        per-step values in ``run_dir/steps.jsonl`` (``StepLog``). Opened when training starts (task
        ``t``, after a resume has restored the step count), a resume purges what the interrupted run
        logged past that step, so the curves do not double back."""
        purge = self.global_step if resume else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self.steplog = StepLog(self.run_dir / "steps.jsonl", (t, self.global_step) if resume else None)

    def steps_of_run(self, method: Method) -> int:
        """Optimizer steps of every task of the run (each task's clips plus the buffer's, when the method keeps one)."""
        s, seen, total = self.s, 0, 0
        for t, classes in enumerate(self.plan.task_classes):
            clips = len(train_indices(self.plan, classes, s.max_per_class, s.seed))
            clips += s.buffer_per_class * seen if method.NEEDS_BUFFER else 0
            total += s.epochs_of(t) * batches_per_epoch(clips, s.batch_size, self.dist.world)
            seen += len(classes)
        return total

    def task(self, t: int) -> Task:
        old = tuple(k for tc in self.plan.task_classes[:t] for k in tc)
        return Task(t, old, tuple(self.plan.task_classes[t]))

    def train_task(self, method: Method, model: CIGN, t: int, resume: bool = False) -> None:
        """Train, evaluate and checkpoint task ``t``; ``resume`` first restores its epochs done from ``last.pt``."""
        s, task, started = self.s, self.task(t), time.perf_counter()
        torch.manual_seed(s.seed * 1_000_003 + t)  # each task's randomness is independent of resumes
        method.task = task
        method.begin_task(task)
        if t > 0:
            model.grow(len(task.new_classes))
        if not s.model.use_avctd:  # the token classifier only feeds the token CE (eq 8)
            model.token_cls.requires_grad_(False)
        method.forward = model
        if self.dist.world > 1:
            method.forward = DistributedDataParallel(model, device_ids=[self.dist.device] if
                                                     self.dist.device.type == "cuda" else None)
        optimizer = torch.optim.Adam(param_groups(model, method, s))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        guard = StepGuard(model, redo=self.amp_dtype == torch.bfloat16)
        new_idx = train_indices(self.plan, task.old_classes + task.new_classes if method.TRAINS_ON_SEEN
                                else task.new_classes, s.max_per_class, s.seed)
        exemplars, held = self.buffer.indices, np.zeros(0, dtype=np.int64)
        if method.HOLDOUT:
            held = np.union1d(withheld(self.plan, new_idx, task.new_classes, method.HOLDOUT, s.seed),
                              withheld(self.plan, exemplars, task.old_classes, method.HOLDOUT, s.seed))
            new_idx, exemplars = np.setdiff1d(new_idx, held), np.setdiff1d(exemplars, held)
        idx = np.union1d(new_idx, exemplars) if method.NEEDS_BUFFER else new_idx
        weights = self.class_balance(idx) if len(idx) > len(new_idx) else None
        steps = s.epochs_of(t) * batches_per_epoch(len(idx), s.batch_size, self.dist.world)
        scheduler = task_scheduler(optimizer, s.lr_schedule, steps, s.warmup)
        start_epoch = self.restore_last(t, model, method, optimizer, scaler, scheduler, guard) if resume else 0
        if self.dist.main and self.writer is None:
            self.open_writer(t, resume)
        if resume and self.dist.main:
            tqdm.write(self.resume_point(t, start_epoch))
        last = {}
        for epoch in range(start_epoch, s.epochs_of(t)):
            last = self.train_epoch(method, model, optimizer, scaler, scheduler, guard, idx, t, epoch, weights)
            self.save_last(t, epoch + 1, model, method, optimizer, scaler, scheduler, guard)
        D.check_in_sync(model, self.dist, method.parameters())
        for a in ACTIONS:
            self.guarded[a].append(guard.counts[a])
        if self.writer is not None:
            diagnostics = self.task_diagnostics(method) if len(self.buffer.indices) else {}
            for k, v in diagnostics.items():
                self.writer.add_scalar(k, v, t)
            self.steplog.write(task=t, event="task_end", global_step=self.global_step, **diagnostics,
                               **{f"guard_{a}": guard.counts[a] for a in ACTIONS})
        if method.NEEDS_BUFFER:
            self.update_buffer(model, new_idx)
        method.end_task(task, TaskData(self.batches(new_idx), self.batches(self.buffer.indices), self.batches(held)))
        acc = evaluate_tasks(method, self.plan, t, self.inputs, self.autocast, s.batch_size, s.workers, self.dist,
                             s.eval_split)
        earlier = len(collapses({m: v[:t] for m, v in self.seen.items()}, self.classes_seen()))
        acc.append_to(self.rows, self.seen)
        self.eval_clips = acc.eval_clips
        collapsed = collapses(self.seen, self.classes_seen())[earlier:]
        if self.writer is not None:
            for m in MODALITIES:
                self.writer.add_scalar(f"accuracy_seen/{m}", acc.seen[m], t)
                for i, a in enumerate(acc.per_task[m]):
                    self.writer.add_scalar(f"accuracy_task{i}/{m}", a, t)
            self.writer.flush()
        if self.dist.main:
            self.save_task(t, model, method)
            self.write_metrics()
            (self.run_dir / "last.pt").unlink(missing_ok=True)
            loss_txt = " ".join(f"{k} {v:.3f}" for k, v in last.items())
            guarded = (f" | non-finite gradient: {guard.counts['fp32']} step(s) redone in fp32, {guard.counts['skipped']} "
                       "skipped (steps.jsonl)" if any(guard.counts.values()) else "")
            tqdm.write(
                f"task {t + 1}/{len(self.plan.task_classes)} classes {list(task.new_classes)}: seen-class {s.eval_split} accuracy "
                f"audio-visual {acc.seen['audio_visual']:.1f}%, audio {acc.seen['audio']:.1f}%, "
                f"visual {acc.seen['visual']:.1f}% | {loss_txt} | {len(idx)} train clips, "
                f"{time.perf_counter() - started:.0f} s{guarded}"
            )
            for warning in collapsed:
                tqdm.write(f"WARNING: {warning}; check the run's steps.jsonl before using this model", file=sys.stderr)

    def batches(self, idx: np.ndarray):
        """A callable that iterates over the store clips ``idx`` as un-augmented Inputs batches."""
        if len(idx) == 0:
            return lambda: iter(())
        return lambda: (self.inputs(b) for b in batch_loader(self.plan.store, idx, self.s.batch_size, shuffle=False,
                                                             workers=self.s.workers))

    def class_balance(self, idx: np.ndarray) -> np.ndarray | None:
        """Sampling weights 1 / (clips of the class) over a task's clips plus buffer, or None for uniform.

        The paper trains on "the task's data plus the buffer" without saying how batches are drawn.
        Drawn uniformly, a new class (160 avdigits clips) is 3.2x as frequent as an old one (50
        exemplars), and the heads learn that prior: in the default run the visual head, unable to
        tell digits apart, put the newest classes first and pulled p_a * p_v with it (old tasks 0-19 %
        audio-visual against 11-35 % audio-only). ``balanced`` draws every seen class equally often.
        """
        if self.s.rehearsal_sampling == "uniform":
            return None
        labels = self.plan.label_map[self.plan.store.labels[idx]]
        return 1.0 / np.bincount(labels)[labels]

    def task_diagnostics(self, method, most: int = 128) -> dict[str, float]:
        """``method.diagnose`` averaged over up to ``most`` of the rehearsal buffer's exemplars (the old
        classes; an even stride through the buffer's class-ordered list), by batch size."""
        idx = self.buffer.indices
        idx = idx[np.linspace(0, len(idx) - 1, min(most, len(idx))).astype(int)]
        sums: dict[str, float] = {}
        n = 0
        for batch in batch_loader(self.plan.store, idx, self.s.batch_size, shuffle=False, workers=0):
            with self.autocast():
                values = method.diagnose(self.inputs(batch))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(batch.labels)
            n += len(batch.labels)
        return {k: v / n for k, v in sums.items()}

    def train_epoch(self, method, model, optimizer, scaler, scheduler, guard: StepGuard, idx, t: int, epoch: int,
                    weights=None) -> dict[str, float]:
        """One epoch of task ``t``: a step per batch (a short last batch folded into the one before,
        ``batch_loader``'s ``last="fold"``), each through ``guard``; returns the mean of each loss term."""
        s = self.s
        model.train()
        loader = batch_loader(self.plan.store, idx, s.batch_size, shuffle=True, workers=s.workers,
                              seed=s.seed * 100_003 + t * 1009 + epoch, pin_memory=self.dist.device.type == "cuda",
                              rank=self.dist.rank, world=self.dist.world, weights=weights, last="fold")
        bar = tqdm(loader, desc=f"task {t + 1} epoch {epoch + 1}/{s.epochs_of(t)}", leave=False,
                   disable=not (self.progress and self.dist.main))
        sums: dict[str, float] = {}
        timed = self.dist.device.type == "cpu" and self.dist.main and self.timing is not None
        for step, batch in enumerate(bar):
            if timed and step in (1, 1 + TIMED_STEPS):  # after the first step: it allocates
                if step == 1:
                    self.timing = time.perf_counter()
                else:
                    seconds = (time.perf_counter() - self.timing) / TIMED_STEPS
                    tqdm.write(cpu_estimate(s, self.steps_of_run(method) - self.global_step, seconds))
                    self.timing = timed = None
            x = self.inputs(batch, augment=True)
            guard.capture()
            with self.autocast():
                losses = method.observe(x)
            names = list(losses)
            values = dict(zip(names, torch.stack([losses[k].detach().float() for k in names]).tolist()))  # one sync
            if step == 0 and epoch in (0, s.epochs_of(t) - 1) and self.dist.world == 1:
                values |= grad_ratios(losses, shared_parameters(model))  # a task's first and last epoch
            bad = [k for k, v in values.items() if not k.startswith("diag/") and not math.isfinite(v)]
            if bad:
                raise NonFiniteLoss(
                    f"non-finite loss ({', '.join(f'{k}={values[k]}' for k in bad)}) at task {t + 1}, epoch "
                    f"{epoch + 1}, step {step + 1}; finished tasks and epochs are saved in {self.run_dir}"
                )
            norm, action = guard.step(losses["total"], lambda: method.observe(x)["total"], optimizer, scaler,
                                      lambda: D.average_gradients(method.parameters(), self.dist))
            if action != "skipped":
                values["diag/grad_norm"] = norm  # of the gradient applied
            lr = scheduler.get_last_lr()[-1]  # --lr's group (param_groups puts it last)
            if self.writer is not None:
                self.writer.add_scalar("lr", lr, self.global_step)
                self.steplog.write(task=t, epoch=epoch, step=step, global_step=self.global_step, lr=lr,
                                   clips=len(x.labels), **values, **({"guard": action} if action else {}))
            scheduler.step()
            for k, v in values.items():
                diagnostic = k.startswith("diag/")  # logged per step as is, not a loss term
                if not diagnostic:
                    sums[k] = sums.get(k, 0.0) + v
                if self.writer is not None:
                    self.writer.add_scalar(k if diagnostic else f"loss/{k}", v, self.global_step)
            self.global_step += 1
            bar.set_postfix(loss=f"{values['total']:.3f}")
        return {k: v / max(1, len(loader)) for k, v in sums.items()}

    @torch.no_grad()
    def update_buffer(self, model: CIGN, new_idx: np.ndarray) -> None:
        """Keep ``buffer_per_class`` exemplars of each new class (random, or herding on encoder features)."""
        labels = self.plan.label_map[self.plan.store.labels[new_idx]]
        features = None
        if self.buffer.select == "herding":
            model.eval()
            feats = []
            for batch in batch_loader(self.plan.store, new_idx, self.s.batch_size, shuffle=False, workers=self.s.workers):
                x = self.inputs(batch)
                with self.autocast():
                    f_a, f_v = model.encoder_features(x.spectrograms, x.frames)
                feats.append(torch.cat([f_a, f_v], dim=1).float().cpu())
            features = torch.cat(feats).numpy()
        self.buffer.update(new_idx, labels, features)

    # ----------------------------------------------------------------------------- checkpoints
    def save_task(self, t: int, model: CIGN, method: Method) -> None:
        """Write ``task_{t}.pt``; a model with a non-finite tensor is refused, naming them, and nothing is written."""
        path = ck.task_path(self.run_dir, t)
        try:
            checkpoint = ck.TaskCheckpoint(
                task=t,
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                config=self.s.model,
                spec=self.spec,
                classes=self.plan.class_names[: model.n_classes],
                classes_per_task=[len(c) for c in self.plan.task_classes[: t + 1]],
                tokens=model.tokens.detach().cpu().clone(),
                method=self.s.method,
                settings=self.s.to_dict(),
                buffer=self.buffer.state_dict(),
                evaluation={"rows": self.rows, "seen": self.seen, "eval_clips": self.eval_clips,
                            "global_step": self.global_step, "guarded": self.guarded},
                world_size=self.dist.world,
                method_state=method.state_dict(),
            )
        except ck.NonFiniteCheckpoint as e:
            raise ck.NonFiniteCheckpoint(f"{path} not written: task {t + 1}'s {e}; the finished tasks before it are "
                                         f"saved in {self.run_dir}") from e
        checkpoint.save(path)

    def save_last(self, t: int, epochs_done: int, model, method, optimizer, scaler, scheduler, guard: StepGuard) -> None:
        """``last.pt`` after ``epochs_done`` epochs of task ``t``; refused, naming them, where a tensor is non-finite."""
        if not self.dist.main:
            return
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        try:
            ck.check_finite(model=weights, method=method.state_dict())
        except ck.NonFiniteCheckpoint as e:
            raise ck.NonFiniteCheckpoint(f"{self.run_dir / 'last.pt'} not written after epoch {epochs_done} of task "
                                         f"{t + 1}: {e}") from e
        ck.save_atomic(
            {
                "format": ck.FORMAT,
                "version": ck.VERSION,
                "task": t,
                "epochs_done": epochs_done,
                "model": weights,
                "method": method.state_dict(),  # e.g. L2P's prompts, trained with the model
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "global_step": self.global_step,
                "guard": guard.counts,
            },
            self.run_dir / "last.pt",
        )

    def restore_last(self, t: int, model, method, optimizer, scaler, scheduler, guard: StepGuard) -> int:
        """Epochs of task ``t`` already done according to ``last.pt`` (0 when there is none or it is of
        another task); the model, the method's state, optimizer, scaler, lr schedule and RNG continue
        from there. Only a resume calls it."""
        path = self.run_dir / "last.pt"
        if not path.is_file():
            return 0
        state = ck.load(path)
        if state["task"] != t:
            return 0
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        guard.counts.update(state["guard"])
        self.global_step = int(state.get("global_step", self.global_step))
        return int(state["epochs_done"])

    def resume_point(self, t: int, epochs_done: int) -> str:
        """The line a resume prints: where it continues and what it skips."""
        epochs = self.s.epochs_of(t)
        done = [f"task {t}" if t == 1 else f"tasks 1-{t}"] if t else []
        if epochs_done:
            done.append(f"{epochs_done} epoch(s) of task {t + 1}")
        where = f"epoch {epochs_done + 1}/{epochs}" if epochs_done < epochs else "its evaluation (all epochs done)"
        return f"resuming {self.run_dir} at task {t + 1}, {where} ({' and '.join(done) or 'nothing'} done)"
