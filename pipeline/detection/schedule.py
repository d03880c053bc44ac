"""The training schedule: :class:`Schedule`, the schema of ``conf/schedule/*.yaml`` and the one place of its
defaults (the YAML files hold only what differs), and its LR curve :func:`lr_factor`.

detectron2's recipe: SGD with momentum, linear warm-up then step decay (``WarmupMultiStepLR``). Plain Python
(no torch): Hydra registers the class as the ``schedule`` group's schema (``stages/config.py``);
:mod:`pipeline.detection.solver` builds the optimizer and LR scheduler from it.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass
from functools import partial
from typing import Sequence


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """LR multiplier at iteration ``it`` (0-based): linear warm-up from ``warmup_factor``, then x gamma per step."""
    f = gamma ** bisect_right(list(steps), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def _ints(v):
    return None if v is None else tuple(int(x) for x in v)


@dataclass
class Schedule:
    """A training schedule. The defaults are detectron2's 24k-iteration recipe with the LR actually decaying
    (``conf/schedule/default.yaml`` adds only its name).

    ``batch_size`` is the global batch (detectron2's ``IMS_PER_BATCH``, split over DDP processes; iteration
    counts assume it); ``amp`` applies on CUDA only; ``clip_grad`` None = no clipping (the recipe has none).
    Image sizes and RoI sampling are the detector's (``DetectorSettings``; ``schedule=smoke`` shrinks them by
    a Hydra override).
    """
    iterations: int = 24000  # total SGD iterations
    batch_size: int = 16  # global images per iteration
    lr: float = 0.02  # base learning rate (for batch 16)
    momentum: float = 0.9
    weight_decay: float = 1e-4  # none on norm layers (detectron2 WEIGHT_DECAY_NORM=0)
    warmup_iters: int = 100  # linear warm-up from lr * warmup_factor
    warmup_factor: float = 0.001
    steps: tuple[int, ...] = (18000, 22000)  # LR x gamma at each
    gamma: float = 0.1
    checkpoint_period: int = 2000  # model.pt every N iterations (and at the end): what a resume continues from
    log_period: int = 20  # a metrics.jsonl line every N iterations
    amp: bool = True  # float16 autocast + grad scaling; on CUDA only
    clip_grad: float | None = None  # max global gradient L2 norm
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
        from pipeline.detection.settings import from_plain

        return from_plain(cls, d, "schedule key")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def lr_lambda(self):
        return partial(lr_factor, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor,
                       steps=tuple(self.steps), gamma=self.gamma)
