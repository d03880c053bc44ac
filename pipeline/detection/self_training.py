"""Self-training (CutLER, Wang et al. CVPR 2023, Sec. 3.3): the pseudo-labels of round r+1 from the detector of
round r. Implemented from the paper; CutLER's code (CC BY-NC-SA) is not used.

:func:`merge_round`: the detector's predictions on the training images scoring at least the round's threshold
are kept (at most ``max_per_image``, best first), and every previous pseudo-object whose IoU with all kept
predictions of its image is below ``iou_threshold`` (0.5) is added back, so objects the detector missed are not
forgotten. IoU is of masks when both sides have them (compressed RLE), else of boxes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.boxes import iou_matrix, xywh_to_xyxy


def _ious(kept: Sequence[dict], previous: Sequence[dict]) -> np.ndarray:
    """(len(previous), len(kept)) IoU: of masks when every object has one, else of boxes (COCO ``bbox`` xywh)."""
    if not kept or not previous:
        return np.zeros((len(previous), len(kept)))
    if all("segmentation" in a for a in (*kept, *previous)):
        from pycocotools import mask as mask_utils

        from pipeline.masks import _as_pycoco

        return np.asarray(mask_utils.iou([_as_pycoco(a["segmentation"]) for a in previous],
                                         [_as_pycoco(a["segmentation"]) for a in kept], [0] * len(kept)))
    return iou_matrix(xywh_to_xyxy([a["bbox"] for a in previous]), xywh_to_xyxy([a["bbox"] for a in kept]))


def merge_round(predictions: Sequence[dict], previous: Sequence[dict], *, score_threshold: float,
                iou_threshold: float = 0.5, max_per_image: int | None = None) -> list[dict]:
    """The next round's pseudo-objects (COCO annotations without ids, ``source`` = "prediction" or "previous").

    ``predictions``: COCO results of the round's detector (``image_id``, ``bbox`` xywh, ``score``, optionally
    ``segmentation``); ``previous``: the round's pseudo-objects (COCO annotations, ``bbox``, optionally
    ``segmentation`` and ``score``). Per image: predictions with ``score >= score_threshold``, best first, at most
    ``max_per_image``; then the previous objects whose IoU with every kept prediction is ``< iou_threshold``.
    Ties in score keep the predictions' order."""
    by_image: dict[int, tuple[list, list]] = {}
    for p in predictions:
        by_image.setdefault(int(p["image_id"]), ([], []))[0].append(p)
    for a in previous:
        by_image.setdefault(int(a["image_id"]), ([], []))[1].append(a)
    out: list[dict] = []
    for image_id in sorted(by_image):
        preds, prev = by_image[image_id]
        kept = sorted((p for p in preds if float(p["score"]) >= score_threshold), key=lambda p: -float(p["score"]))
        kept = kept[:max_per_image] if max_per_image is not None else kept
        ious = _ious(kept, prev)
        back = [a for a, row in zip(prev, ious) if not (row >= iou_threshold).any()]
        for p in kept:
            out.append({**{k: v for k, v in p.items() if k != "id"}, "category_id": 1, "source": "prediction"})
        for a in back:
            out.append({**{k: v for k, v in a.items() if k != "id"}, "source": "previous"})
    return out
