"""One iteration-based training loop for every detector (train-cag: K=1, train-cad: K clusters).

detectron2-style (``tools/lazyconfig_train_net.py:do_train``): the caller builds the pieces and the
:class:`Trainer` runs them::

    model = prepare_model(spec.build_model(), device)          # on its device, SyncBN under DDP on CUDA
    optimizer = build_optimizer(model, schedule)               # pipeline.detection.solver
    scheduler = build_scheduler(optimizer, schedule)
    loader = build_train_loader(dataset, schedule.batch_size, seed=seed)
    result = Trainer(create_ddp_model(model, device), optimizer, scheduler, loader, schedule, out_dir=...,
                     checkpointer=checkpointer).train(resume=...)

- :class:`~pipeline.detection.schedule.Schedule`: the hyper-parameters (the schema of ``conf/schedule``);
- :class:`~pipeline.detection.checkpoint.Checkpointer`: ``model.pt`` (model, optimizer, scheduler, scaler,
  iteration, RNG states, spec, artifact config), written atomically; ``resume=True`` reloads it and
  continues exactly where the run stopped (the sample order and flips are a pure function of (seed,
  position); RNG states are restored);
- :class:`Trainer`: the loop; it calls :class:`~pipeline.detection.hooks.Hook` s (``default_hooks``: progress
  bar, metrics.jsonl, TensorBoard, checkpoints; then any others given: EMA, periodic evaluation...);
- :func:`train`: the one-call form (builds the pieces above).

Multi-GPU: run the same entry point under ``torchrun --nproc_per_node=N``; call :func:`init_distributed`
first. ``batch_size`` is the global batch (detectron2's ``IMS_PER_BATCH``), split evenly over ranks; only
rank 0 writes files. One CPU process works the same way without torchrun.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.detection.checkpoint import Checkpointer, set_rng_state
from pipeline.detection.data import TrainLoader
from pipeline.detection.hooks import Hook, MetricsLogger, PeriodicCheckpoint, ProgressBar, TensorBoard
from pipeline.detection.schedule import Schedule, lr_factor  # noqa: F401  (re-exported)
from pipeline.detection.solver import build_optimizer, build_scheduler, param_groups  # noqa: F401


@dataclass
class TrainResult:
    iteration: int  # iterations completed in total
    start_iteration: int  # where this call started (> 0 after a resume)
    losses: list[float] = field(default_factory=list)  # total loss of each iteration run by this call
    checkpoint: Path | None = None
    metrics: Path | None = None
    stopped_early: bool = False


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


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


def prepare_model(model: nn.Module, device: str | torch.device, sync_bn: bool = True) -> nn.Module:
    """``model`` on ``device``; under DDP on CUDA its batch norms become SyncBN (``sync_bn``). Build the
    optimizer on what this returns."""
    device = torch.device(device)
    model.to(device)
    if _rank_world()[1] > 1 and sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def create_ddp_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when a process group is initialised, else itself."""
    device = torch.device(device)
    if _rank_world()[1] <= 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_train_loader(dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0, flip: bool = True,
                       device: str | torch.device = "cpu") -> TrainLoader:
    """This process's share of the global ``batch_size`` per iteration, endless and seeded (exact resume)."""
    rank, world = _rank_world()
    return TrainLoader(dataset, batch_size, seed=seed, rank=rank, world=world, num_workers=num_workers, flip=flip,
                       pin_memory=torch.device(device).type == "cuda")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """detectron2-style iteration loop for a torchvision detector (``model(images, targets)`` -> loss dict).

    Takes the built pieces: ``model`` (on its device; DDP-wrapped or not: the checkpoint holds the module),
    ``optimizer``, ``scheduler``, ``loader`` (a :class:`~pipeline.detection.data.TrainLoader`); makes the AMP
    grad scaler (``schedule.amp`` on CUDA); :meth:`train` restores the checkpoint on ``resume`` and runs the
    steps, calling ``hooks``: ``default_hooks`` (progress bar, metrics.jsonl, TensorBoard, checkpoints)
    followed by ``extra_hooks``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader: TrainLoader,
                 schedule: Schedule, *, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 progress: bool = True, stop_after: int | None = None, checkpointer: Checkpointer | None = None,
                 extra_hooks: Sequence[Hook] = ()) -> None:
        self.rank, self.world = _rank_world()
        self.net, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.schedule, self.seed = schedule, loader.seed
        self.out_dir, self.device, self.stop_after = Path(out_dir), torch.device(device), stop_after
        self.checkpointer = checkpointer or Checkpointer(self.out_dir / "model.pt", schedule=schedule.to_dict())
        self.use_amp = schedule.amp and self.device.type == "cuda"
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

    def _restore(self, resume: bool) -> tuple[int, dict | None]:
        if resume and self.checkpointer.exists():
            return self.checkpointer.restore(self.model, self.optimizer, self.scheduler, self.scaler)
        if resume:
            warnings.warn(f"resume requested but {self.checkpointer.path} does not exist: training from scratch",
                          stacklevel=4)
        return 0, None

    def train(self, resume: bool = False) -> TrainResult:
        """Run the schedule (``resume``: continue the checkpoint's run exactly); see :func:`train`."""
        sch, device, rank = self.schedule, self.device, self.rank
        start, rng = self._restore(resume)
        self.start_iteration = self.iteration = start
        result = TrainResult(iteration=start, start_iteration=start, checkpoint=self.checkpointer.path,
                             metrics=self.out_dir / "metrics.jsonl")
        self.losses = result.losses
        if start >= sch.iterations:
            return result
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        loader = self.loader.loader(start)
        if rng is not None and rank == 0:
            set_rng_state(rng)
        else:
            _seed_all(self.seed + 1000003 * rank + start)
        for h in self.hooks:
            h.before_train(self)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.net.train()
        batches = iter(loader)
        for it in range(start, sch.iterations):
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            # what the model reads: "scores" are the pseudo-boxes' (score weighting's soft targets; others ignore them)
            targets = [{k: t[k].to(device) for k in ("boxes", "labels", "masks", "scores") if k in t} for t in targets]
            with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                loss_dict = self.net(images, targets)
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
    loader = build_train_loader(dataset, schedule.batch_size, seed=seed, num_workers=num_workers, flip=flip,
                                device=device)
    model = prepare_model(model, device, sync_bn=sync_bn)
    optimizer = build_optimizer(model, schedule, weight_decay_norm)
    trainer = Trainer(create_ddp_model(model, device), optimizer, build_scheduler(optimizer, schedule), loader,
                      schedule, out_dir=out_dir, device=device, progress=progress, stop_after=stop_after,
                      checkpointer=checkpointer, extra_hooks=hooks)
    return trainer.train(resume)
