"""One iteration-based training loop for every detector (train-cag: K=1, train-cad: K clusters).

detectron2-style: SGD with momentum, linear warm-up then step decay (``WarmupMultiStepLR``), no
weight decay on norm layers (``WEIGHT_DECAY_NORM=0``), an endless seeded sampler, checkpoints
``model.pt`` = {model, optimizer, scheduler, scaler, iteration, rng, config, detector_info}
written atomically; ``resume=True`` reloads them and continues exactly where the run stopped
(the sample order and flips are a pure function of (seed, position); RNG states are restored).

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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.artifacts import atomic_path
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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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


def train(model: nn.Module, dataset, *, out_dir: str | os.PathLike, iterations: int, batch_size: int, lr: float,
          momentum: float = 0.9, weight_decay: float = 1e-4, weight_decay_norm: float = 0.0, warmup_iters: int = 100,
          warmup_factor: float = 0.001, steps: Sequence[int] = (), gamma: float = 0.1, checkpoint_period: int = 5000,
          seed: int = 0, resume: bool = False, amp: bool = True, clip_grad: float | None = None, num_workers: int = 0,
          device: str | torch.device = "cpu", log_period: int = 20, progress: bool = True,
          stop_after: int | None = None, extra_state: dict | None = None, flip: bool = True,
          sync_bn: bool = True) -> TrainResult:
    """Train ``model`` (a torchvision detector, modified in place) on ``dataset`` for ``iterations``.

    ``amp`` applies on CUDA only (float16 autocast + GradScaler). ``clip_grad``: max global L2 norm,
    None = off. ``stop_after``: stop once that many iterations are done, after checkpointing, as if
    killed (tests). ``extra_state``: stored as the checkpoint's ``config``. Writes ``model.pt`` and
    ``metrics.jsonl`` (one JSON line per ``log_period``) under ``out_dir``.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes; change it or --nproc_per_node")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    out_dir, device = Path(out_dir), torch.device(device)
    ckpt_path, metrics_path = out_dir / "model.pt", out_dir / "metrics.jsonl"
    use_amp = bool(amp) and device.type == "cuda"
    model.to(device)
    if world > 1 and sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(param_groups(model, weight_decay, weight_decay_norm), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_iters=warmup_iters, warmup_factor=warmup_factor, steps=tuple(steps), gamma=gamma))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, rng = 0, None
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, rng = int(ckpt["iteration"]), ckpt["rng"]
    elif resume:
        warnings.warn(f"resume requested but {ckpt_path} does not exist: training from scratch", stacklevel=2)
    result = TrainResult(iteration=start, start_iteration=start, checkpoint=ckpt_path, metrics=metrics_path)
    if start >= iterations:
        return result
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            metrics_path.unlink(missing_ok=True)
        else:
            _trim_metrics(metrics_path, start)
    per_rank = batch_size // world
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=InfiniteSampler(len(dataset), seed, start * batch_size, rank, world, flip),
        num_workers=num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda")
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if rng is not None and rank == 0:
        _set_rng_state(rng)
    else:
        _seed_all(seed + 1000003 * rank + start)
    tb = _tensorboard(out_dir) if rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc="train", dynamic_ncols=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    net.train()
    batches = iter(loader)
    t_log, it_log = time.perf_counter(), start
    for it in range(start, iterations):
        images, targets = next(batches)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss_dict = net(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at iteration {it} ({ {k: v.item() for k, v in loss_dict.items()} }); "
                                     "lower the learning rate or check the boxes")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        scaler.update()
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        done = it + 1
        result.losses.append(float(loss.item()))
        result.iteration = done
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{lr_now:.2e}")
        if done % log_period == 0 or done == iterations or done == stop_after:
            vals = {k: v.detach().float() for k, v in loss_dict.items()}
            if world > 1:
                for v in vals.values():
                    dist.all_reduce(v)
                    v /= world
            now = time.perf_counter()
            spi = (now - t_log) / max(done - it_log, 1)
            t_log, it_log = now, done
            if rank == 0:
                line = {"iteration": done, "loss": sum(v.item() for v in vals.values()),
                        **{k: v.item() for k, v in vals.items()}, "lr": lr_now, "sec_per_iter": spi,
                        "eta_s": spi * (iterations - done), "time": time.time()}
                if device.type == "cuda":
                    line["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
                if tb is not None:
                    for k, v in line.items():
                        if k not in ("iteration", "time"):
                            tb.add_scalar(f"train/{k}", v, done)
        if rank == 0 and (done % checkpoint_period == 0 or done == iterations or done == stop_after):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": done,
                     "rng": _rng_state(), "config": extra_state or {},
                     "detector_info": getattr(model, "detector_info", None)}
            with atomic_path(ckpt_path, suffix=".pt") as tmp:
                torch.save(state, tmp)
        if done == stop_after:
            result.stopped_early = done < iterations
            break
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    return result
