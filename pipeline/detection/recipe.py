"""CutLER's training recipe on top of a detector's schedule (:class:`TrainRecipe`): DropLoss and copy-paste, and
CuVLER's score weighting. Off by default (LOST's recipe); the CutLER presets turn DropLoss and copy-paste on. The train stages' config sections extend this class
(``train_cag.drop_loss_iou`` ...), so its defaults live here only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List

from pipeline.settings import Settings


@dataclass
class TrainRecipe(Settings):
    # DropLoss (CutLER Eq. 1): the box head's loss of a proposal whose best IoU with every pseudo-box is at most
    # this is dropped (pipeline/detection/droploss.py). 0: off (LOST's recipe); CutLER: 0.01
    drop_loss_iou: float = 0.0
    # copy-paste (Ghiasi et al. 2021, as CutLER): the share of training samples that get objects of another image
    # pasted with their masks (pipeline/detection/copy_paste.py; needs a mask detector and masks). 0: off
    copy_paste: float = 0.0
    copy_paste_scale: List[float] = field(default_factory=lambda: [0.3, 1.0])  # the pasted objects' scale range
    # CuVLER's soft targets: each pseudo-box's class, box and mask losses weighted by its score (VoteCut's; 1.0 in
    # files without scores), the RPN's not (pipeline/detection/score_weighting.py). false: off
    score_weighting: bool = False

    def rules(self) -> list[tuple[str, bool, str]]:
        lo, hi = (list(self.copy_paste_scale) + [0, 0])[:2]
        return [("drop_loss_iou", 0 <= self.drop_loss_iou < 1, "must be in [0, 1) (0: off)"),
                ("copy_paste", 0 <= self.copy_paste <= 1, "must be a probability in [0, 1] (0: off)"),
                ("copy_paste_scale", len(self.copy_paste_scale) == 2 and 0 < lo <= hi,
                 "must be [low, high] with 0 < low <= high")]

    def recorded(self) -> dict:
        """The settings that differ from LOST's recipe (what a trained model records: a model trained before
        these settings existed is the same as one trained with all of them off)."""
        defaults = TrainRecipe()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainRecipe)
                if getattr(self, f.name) != getattr(defaults, f.name)}

    @classmethod
    def of(cls, values: dict) -> "TrainRecipe":
        """The recipe part of a train section's values."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
