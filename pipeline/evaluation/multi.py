"""Scores for miners that give several boxes per image.

CorLoc of the rank-0 box (:func:`pipeline.evaluation.corloc.corloc`) stays the single-object protocol and
the headline number. Beside it:

- object recall at IoU ``iou_threshold``: the fraction of ground-truth objects that some box of their image
  overlaps with IoU >= the threshold (the GT boxes CorLoc scores against: crowd dropped, difficult kept);
- boxes per image: the mean number of boxes over the scored images;
- "any-box CorLoc" (MOST's protocol): the percentage of images where ANY box hits a GT box. It is not
  CorLoc and is always reported under its own name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pipeline.boxes import iou_matrix
from pipeline.data.records import ImageRecord
from pipeline.evaluation.corloc import scoring_gt


@dataclass
class MultiBoxScores:
    object_recall: float | None      # percent of GT objects covered, None without GT
    objects_covered: int
    objects_total: int
    boxes_per_image: float | None
    any_box_corloc: float | None     # percent of images where some box hits (MOST's protocol), not CorLoc
    any_box_hits: int
    images_scored: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def multi_box_scores(boxes: Mapping[str, np.ndarray], records: Sequence[ImageRecord],
                     iou_threshold: float = 0.5) -> MultiBoxScores:
    """``boxes``: image id -> (n, 4) xyxy boxes (n may be 0). Records without GT boxes are left out."""
    covered = total = hits = images = n_boxes = 0
    for r in records:
        gt = scoring_gt(r) if r.has_gt else np.zeros((0, 4))
        if len(gt) == 0:
            continue
        b = np.asarray(boxes.get(r.image_id, np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        b = b[np.isfinite(b).all(axis=1)]
        images += 1
        n_boxes += len(b)
        total += len(gt)
        if len(b) == 0:
            continue
        iou = iou_matrix(b, gt)                       # (n boxes, n gt)
        covered += int((iou.max(axis=0) >= iou_threshold).sum())
        hits += int((iou.max() >= iou_threshold))
    pct = lambda a, n: 100.0 * a / n if n else None  # noqa: E731
    return MultiBoxScores(object_recall=pct(covered, total), objects_covered=covered, objects_total=total,
                          boxes_per_image=(n_boxes / images if images else None),
                          any_box_corloc=pct(hits, images), any_box_hits=hits, images_scored=images)
