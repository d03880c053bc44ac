"""One iteration-based training loop for every detector (train-cag: K=1, train-cad: K clusters).

detectron2-style: SGD with momentum, linear warm-up then step decay (``WarmupMultiStepLR``), no
weight decay on norm layers (``WEIGHT_DECAY_NORM=0``), an endless seeded sampler. The pieces:

- :class:`Schedule`: the hyper-parameters (the fields of ``conf/schedule/*.yaml``), ``Schedule.from_dict``;
- :class:`~pipeline.detection.checkpoint.Checkpointer`: ``model.pt`` (model, optimizer, scheduler,
  scaler, iteration, RNG states, spec, artifact config), written atomically; ``resume=True`` reloads
  it and continues exactly where the run stopped (the sample order and flips are a pure function of
  (seed, position); RNG states are restored);
- :class:`Trainer`: the loop; it calls :class:`Hook` s (``before_train`` / ``after_step`` /
  ``after_train``): :class:`ProgressBar`, :class:`MetricsLogger` (metrics.jsonl), :class:`TensorBoard`,
  :class:`PeriodicCheckpoint`, and any others given (EMA, periodic evaluation...);
- :func:`train`: the one-call form.

Multi-GPU: run the same entry point under ``torchrun --nproc_per_node=N``; call
:func:`init_distributed` first. ``batch_size`` is the global batch (detectron2's
``IMS_PER_BATCH``), split evenly over ranks; the model is wrapped in DDP (BN -> SyncBN on CUDA);
only rank 0 writes files. One CPU process works the same way without torchrun.
"""
from __future__ import annotations

import json
import os
import random
import time
import warnings
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.artifacts import atomic_path
from pipeline.detection.checkpoint import Checkpointer, set_rng_state
from pipeline.detection.data import InfiniteSampler, collate

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class TrainResult:
    iteration: int  # iterations completed in total
    start_iteration: int  # where this call started (> 0 after a resume)
    losses: list[float] = field(default_factory=list)  # total loss of each iteration run by this call
    checkpoint: Path | None = None
    metrics: Path | None = None
    stopped_early: bool = False


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """LR multiplier at iteration ``it`` (0-based): linear warm-up from ``warmup_factor``, then x gamma per step."""
    f = gamma ** bisect_right(list(steps), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Trainable parameters split into (norm layers, others) with their own weight decay."""
    seen, norm, other = set(), [], []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (norm if isinstance(m, _NORMS) else other).append(p)
    return [g for g in ({"params": other, "weight_decay": weight_decay},
                        {"params": norm, "weight_decay": weight_decay_norm}) if g["params"]]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _tensorboard(out_dir: Path):
    """A SummaryWriter into ``out_dir/tensorboard`` when the ``tensorboard`` package is installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is not a dependency: the JSON-lines log is always written
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _trim_metrics(path: Path, upto: int) -> None:
    """Keep the metrics lines of iterations <= ``upto`` (a resumed run rewrites what followed)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("iteration", 0) <= upto]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(ln + "\n" for ln in keep))




# --------------------------------------------------------------------------- the schedule


def _ints(v):
    return None if v is None else tuple(int(x) for x in v)


@dataclass
class Schedule:
    """A training schedule; the fields are those of ``conf/schedule/*.yaml`` (see there for their meaning).

    ``batch_size`` is the global batch (split over DDP processes); ``amp`` applies on CUDA only;
    ``clip_grad`` None = no clipping. Image sizes and RoI sampling are the detector's (``conf/detector``;
    ``schedule=smoke`` shrinks them by a Hydra override).
    """
    iterations: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    checkpoint_period: int = 5000
    log_period: int = 20
    amp: bool = True
    clip_grad: float | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        self.iterations, self.batch_size = int(self.iterations), int(self.batch_size)
        self.lr, self.momentum, self.weight_decay = float(self.lr), float(self.momentum), float(self.weight_decay)
        self.warmup_iters, self.warmup_factor, self.gamma = int(self.warmup_iters), float(self.warmup_factor), float(self.gamma)
        self.steps = _ints(self.steps) or ()
        self.checkpoint_period, self.log_period = int(self.checkpoint_period), int(self.log_period)
        self.amp, self.name = bool(self.amp), str(self.name)
        self.clip_grad = None if self.clip_grad is None else float(self.clip_grad)
        self.check()

    def check(self) -> None:
        """Every field in its range (a ValueError naming the first that is not), before any training starts."""
        finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
        rules = [("iterations", self.iterations >= 0, ">= 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("lr", finite(self.lr) and self.lr > 0, "a positive number"),
                 ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                 ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
                 ("warmup_iters", self.warmup_iters >= 0, ">= 0"),
                 ("warmup_factor", 0 < self.warmup_factor <= 1, "in (0, 1]"),
                 ("steps", all(s >= 0 for s in self.steps) and list(self.steps) == sorted(self.steps),
                  "increasing iteration numbers >= 0"),
                 ("gamma", finite(self.gamma) and self.gamma > 0, "a positive number"),
                 ("checkpoint_period", self.checkpoint_period >= 1, ">= 1"),
                 ("log_period", self.log_period >= 1, ">= 1"),
                 ("clip_grad", self.clip_grad is None or (finite(self.clip_grad) and self.clip_grad > 0),
                  "a positive number or None")]
        for name, ok, what in rules:
            if not ok:
                raise ValueError(f"schedule {self.name}: {name} must be {what}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """From a plain dict (e.g. the resolved ``schedule`` config); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown schedule key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def lr_lambda(self):
        return partial(lr_factor, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor,
                       steps=tuple(self.steps), gamma=self.gamma)


# --------------------------------------------------------------------------- hooks
class Hook:
    """Called by :class:`Trainer` on every process: ``before_train`` once the state is restored (before the
    first step of this call), ``after_step`` after each optimizer step (``trainer.iteration`` = steps done,
    ``trainer.loss_dict``/``trainer.lr`` of that step), ``after_train`` when the loop ends (not on errors).
    Check ``trainer.rank`` before writing files. EMA, periodic evaluation... are hooks."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


class ProgressBar(Hook):
    """A tqdm bar (rank 0) with the loss and LR."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self, trainer):
        if trainer.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.schedule.iterations, initial=trainer.start_iteration, desc="train",
                            dynamic_ncols=True)

    def after_step(self, trainer):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{trainer.losses[-1]:.3f}", lr=f"{trainer.lr:.2e}")

    def after_train(self, trainer):
        if self.bar is not None:
            self.bar.close()


class MetricsLogger(Hook):
    """Every ``period`` iterations (and at the last one): the losses averaged over processes, LR, speed,
    ETA as one JSON line of ``path`` (rank 0); the line is left in ``trainer.log_line`` for later hooks.
    A fresh run starts the file over; a resumed one keeps the lines up to where it resumes."""

    def __init__(self, path: str | os.PathLike, period: int) -> None:
        self.path, self.period = Path(path), int(period)

    def before_train(self, trainer):
        if trainer.rank == 0:
            if trainer.start_iteration == 0:
                self.path.unlink(missing_ok=True)
            else:
                _trim_metrics(self.path, trainer.start_iteration)
        self.t_log, self.it_log = time.perf_counter(), trainer.start_iteration

    def after_step(self, trainer):
        trainer.log_line = None
        done = trainer.iteration
        if not (done % self.period == 0 or trainer.last_step):
            return
        vals = {k: v.detach().float() for k, v in trainer.loss_dict.items()}
        if trainer.world > 1:
            for v in vals.values():
                dist.all_reduce(v)
                v /= trainer.world
        now = time.perf_counter()
        spi = (now - self.t_log) / max(done - self.it_log, 1)
        self.t_log, self.it_log = now, done
        if trainer.rank != 0:
            return
        line = {"iteration": done, "loss": sum(v.item() for v in vals.values()),
                **{k: v.item() for k, v in vals.items()}, "lr": trainer.lr, "sec_per_iter": spi,
                "eta_s": spi * (trainer.schedule.iterations - done), "time": time.time()}
        if trainer.device.type == "cuda":
            line["max_mem_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        trainer.log_line = line


class TensorBoard(Hook):
    """The logged scalars under ``out_dir/tensorboard`` (rank 0), when the tensorboard package is installed.
    Place it after :class:`MetricsLogger`."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir, self.writer = Path(out_dir), None

    def before_train(self, trainer):
        self.writer = _tensorboard(self.out_dir) if trainer.rank == 0 else None

    def after_step(self, trainer):
        line = getattr(trainer, "log_line", None)
        if self.writer is not None and line:
            for k, v in line.items():
                if k not in ("iteration", "time"):
                    self.writer.add_scalar(f"train/{k}", v, trainer.iteration)

    def after_train(self, trainer):
        if self.writer is not None:
            self.writer.close()


class PeriodicCheckpoint(Hook):
    """The checkpoint every ``period`` iterations and at the last one (rank 0)."""

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        self.checkpointer, self.period = checkpointer, int(period)

    def after_step(self, trainer):
        if trainer.rank == 0 and (trainer.iteration % self.period == 0 or trainer.last_step):
            self.checkpointer.save(trainer.model, trainer.optimizer, trainer.scheduler, trainer.scaler,
                                   trainer.iteration)


# --------------------------------------------------------------------------- the loop
class Trainer:
    """detectron2-style iteration loop for a torchvision detector (``model(images, targets)`` -> loss dict).

    Builds the SGD optimizer (no weight decay on norm layers by default), the warm-up + step LR schedule,
    the AMP grad scaler, the endless seeded loader and DDP (when a process group is initialised);
    restores the checkpoint on ``resume``; then runs the steps and calls ``hooks``:
    ``default_hooks`` (progress bar, metrics.jsonl, TensorBoard, checkpoints) followed by ``extra_hooks``.
    """

    def __init__(self, model: nn.Module, dataset, schedule: Schedule, *, out_dir: str | os.PathLike, seed: int = 0,
                 resume: bool = False, device: str | torch.device = "cpu", num_workers: int = 0,
                 progress: bool = True, stop_after: int | None = None, checkpointer: Checkpointer | None = None,
                 extra_hooks: Sequence[Hook] = (), weight_decay_norm: float = 0.0, flip: bool = True,
                 sync_bn: bool = True) -> None:
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) \
            if dist.is_available() and dist.is_initialized() else (0, 1)
        if schedule.batch_size % self.world:
            raise ValueError(f"batch size {schedule.batch_size} is not divisible by the {self.world} processes; "
                             "change it or --nproc_per_node")
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self.dataset, self.schedule, self.seed, self.resume = dataset, schedule, int(seed), bool(resume)
        self.out_dir, self.device = Path(out_dir), torch.device(device)
        self.num_workers, self.stop_after, self.flip = int(num_workers), stop_after, bool(flip)
        self.checkpointer = checkpointer or Checkpointer(self.out_dir / "model.pt", schedule=schedule.to_dict())
        self.use_amp = schedule.amp and self.device.type == "cuda"
        model.to(self.device)
        if self.world > 1 and sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = torch.optim.SGD(param_groups(model, schedule.weight_decay, weight_decay_norm),
                                         lr=schedule.lr, momentum=schedule.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule.lr_lambda())
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.hooks: list[Hook] = [*(self.default_hooks(progress)), *extra_hooks]
        self.start_iteration = self.iteration = 0
        self.losses: list[float] = []
        self.loss_dict: dict = {}
        self.lr = schedule.lr
        self.log_line = None

    def default_hooks(self, progress: bool) -> list[Hook]:
        hooks: list[Hook] = [ProgressBar()] if progress else []
        return hooks + [MetricsLogger(self.out_dir / "metrics.jsonl", self.schedule.log_period),
                        TensorBoard(self.out_dir), PeriodicCheckpoint(self.checkpointer, self.schedule.checkpoint_period)]

    @property
    def last_step(self) -> bool:
        return self.iteration == self.schedule.iterations or self.iteration == self.stop_after

    def train(self) -> TrainResult:
        """Run (or continue) the schedule; see :func:`train`."""
        sch, device, rank, world = self.schedule, self.device, self.rank, self.world
        start, rng = 0, None
        if self.resume and self.checkpointer.exists():
            start, rng = self.checkpointer.restore(self.model, self.optimizer, self.scheduler, self.scaler)
        elif self.resume:
            warnings.warn(f"resume requested but {self.checkpointer.path} does not exist: training from scratch",
                          stacklevel=3)
        self.start_iteration = self.iteration = start
        result = TrainResult(iteration=start, start_iteration=start, checkpoint=self.checkpointer.path,
                             metrics=self.out_dir / "metrics.jsonl")
        self.losses = result.losses
        if start >= sch.iterations:
            return result
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        per_rank = sch.batch_size // world
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=per_rank,
            sampler=InfiniteSampler(len(self.dataset), self.seed, start * sch.batch_size, rank, world, self.flip),
            num_workers=self.num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(self.seed),
            pin_memory=device.type == "cuda")
        net = nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else self.model
        if rng is not None and rank == 0:
            set_rng_state(rng)
        else:
            _seed_all(self.seed + 1000003 * rank + start)
        for h in self.hooks:
            h.before_train(self)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        net.train()
        batches = iter(loader)
        for it in range(start, sch.iterations):
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                loss_dict = net(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at iteration {it} "
                                         f"({ {k: v.item() for k, v in loss_dict.items()} }); "
                                         "lower the learning rate or check the boxes")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if sch.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, sch.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.loss_dict = loss_dict
            self.iteration = result.iteration = it + 1
            result.losses.append(float(loss.item()))
            for h in self.hooks:
                h.after_step(self)
            if self.iteration == self.stop_after:
                result.stopped_early = self.iteration < sch.iterations
                break
        for h in self.hooks:
            h.after_train(self)
        return result


def train(model: nn.Module, dataset, schedule: Schedule | None = None, *, out_dir: str | os.PathLike, seed: int = 0,
          resume: bool = False, device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
          stop_after: int | None = None, checkpointer: Checkpointer | None = None, hooks: Sequence[Hook] = (),
          weight_decay_norm: float = 0.0, flip: bool = True, sync_bn: bool = True, **schedule_fields) -> TrainResult:
    """Train ``model`` (a torchvision detector, modified in place) on ``dataset`` following ``schedule``
    (or a :class:`Schedule` made of ``schedule_fields``: ``iterations=..., batch_size=..., lr=...``).

    Writes ``out_dir``/model.pt (through ``checkpointer``; default: a bare one at that path) and
    metrics.jsonl. ``resume``: continue exactly from the checkpoint (same sample order, flips and RNG
    states). ``stop_after``: stop once that many iterations are done, after checkpointing, as if killed
    (tests). ``hooks`` run after the default ones (progress, metrics, TensorBoard, checkpoints).
    """
    if schedule is None:
        schedule = Schedule(**schedule_fields)
    elif schedule_fields:
        raise TypeError(f"pass either a Schedule or its fields, not both ({sorted(schedule_fields)})")
    return Trainer(model, dataset, schedule, out_dir=out_dir, seed=seed, resume=resume, device=device,
                   num_workers=num_workers, progress=progress, stop_after=stop_after, checkpointer=checkpointer,
                   extra_hooks=hooks, weight_decay_norm=weight_decay_norm, flip=flip, sync_bn=sync_bn).train()
