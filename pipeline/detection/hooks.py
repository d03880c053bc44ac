"""What the trainer calls around its steps: :class:`Hook` and the default ones, :class:`ProgressBar`,
:class:`MetricsLogger` (metrics.jsonl), :class:`TensorBoard`, :class:`PeriodicCheckpoint` (detectron2's
``HookBase`` and its hooks). EMA, periodic evaluation... are hooks too."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.artifacts import atomic_path
from pipeline.detection.checkpoint import Checkpointer

if TYPE_CHECKING:
    from pipeline.detection.trainer import Trainer


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
