"""Per-class mask AP of a class-aware detector's clusters, after the Hungarian matching (which stays on box
AP50, :func:`pipeline.evaluation.hungarian.hungarian_evaluate`): the masks of each class's matched cluster
scored against that class's GT masks, COCO style (pycocotools ``segm``)."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from pipeline.evaluation.coco_ap import evaluate_ap


def _only_class(record, name: str):
    keep = np.array([c == name for c in record.classes], dtype=bool)
    segs = [s for s, k in zip(record.segmentations, keep) if k] if record.segmentations else []
    return replace(record, boxes=record.boxes[keep], classes=[name] * int(keep.sum()),
                   difficult=record.difficult[keep], crowd=record.crowd[keep], segmentations=segs)


def matched_mask_ap(results: Sequence[dict], records: Sequence, matching: Mapping[str, int]) -> dict:
    """``{class: {"mask_AP50", "mask_AP"}}`` for every matched class: the detections of its cluster
    (``results``: COCO results with ``segmentation``, ``category_id`` = cluster) against the GT objects of that
    class in ``records`` (percent; a class whose cluster has no detection scores 0)."""
    out = {}
    for name, cluster in matching.items():
        gt = [_only_class(r, name) for r in records if r.has_gt]
        dets = [dict(d, category_id=1) for d in results if int(d["category_id"]) == int(cluster)]
        ap = evaluate_ap(gt, dets, mode="coco", class_agnostic=True, iou_type="segm")
        out[name] = {"mask_AP50": ap["AP50"], "mask_AP": ap["AP"]}
    return out
