"""The optimizer and LR scheduler of a :class:`~pipeline.detection.schedule.Schedule` (detectron2's
``build_optimizer`` / ``build_lr_scheduler``): SGD with momentum, no weight decay on norm layers
(``WEIGHT_DECAY_NORM=0``), linear warm-up then step decay."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.detection.schedule import Schedule

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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


def build_optimizer(model: nn.Module, schedule: Schedule, weight_decay_norm: float = 0.0) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters (build it after the model is on its device)."""
    return torch.optim.SGD(param_groups(model, schedule.weight_decay, weight_decay_norm), lr=schedule.lr,
                           momentum=schedule.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule's warm-up + step LR curve (:func:`pipeline.detection.schedule.lr_factor`), stepped once per
    iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_lambda())
