"""Scoring a detector's detections against ground truth: LOST+CAD top-1 CorLoc and class-agnostic AP.

Detections are the per-image dicts :func:`pipeline.detection.inference.predict` returns
(``{"image_id": coco_id, "boxes": (n, 4) xyxy, "scores": (n,), "labels": (n,)}``) but nothing here
depends on the detector: any source of boxes and scores in that shape can be scored. Images
without GT (``has_gt=False``) count in the detection totals and are left out of CorLoc and AP.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.boxes import xyxy_to_xywh
from pipeline.evaluation.coco_ap import SUMMARY_KEYS, evaluate_ap
from pipeline.evaluation.corloc import corloc_top1

VOC_KINDS = ("voc07", "voc12")


def ap_mode(dataset_kind: str) -> str:
    """pycocotools AP style for a dataset kind: ``"voc"`` (difficult removed) for VOC, ``"coco"`` otherwise."""
    return "voc" if str(dataset_kind) in VOC_KINDS else "coco"


def as_coco_results(detections: Sequence[dict]) -> list[dict]:
    """Class-agnostic COCO results (``category_id`` 1, ``bbox`` xywh, ``score``, and ``segmentation`` when the
    detections have ``masks``: one RLE per box) at full precision."""
    res = []
    for d in detections:
        boxes = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4)
        masks = d.get("masks")
        for i, (box, score) in enumerate(zip(xyxy_to_xywh(boxes), np.asarray(d["scores"], dtype=np.float64).reshape(-1))):
            res.append({"image_id": int(d["image_id"]), "category_id": 1, "bbox": [float(v) for v in box],
                        "score": float(score)})
            if masks is not None:
                res[-1]["segmentation"] = masks[i]
    return res


def score_detections(detections: Sequence[dict], records: Sequence, *, mode: str = "voc",
                     voc_difficult: str = "remove") -> dict:
    """Count ``detections`` over ``records`` and score them on the records with GT.

    Returns ``{"images", "detections", "images_without_detections", "gt_images", "ap_mode", "corloc",
    "corloc_hits", "corloc_total", "AP50", "AP", "AP75"}`` (+ ``"num_gt"`` when some record has GT;
    the scores are None without GT). CorLoc: the top-scoring box of each image (none = a miss),
    :func:`pipeline.evaluation.corloc.corloc_top1`; AP: class-agnostic pycocotools AP in ``mode``
    (:func:`pipeline.evaluation.coco_ap.evaluate_ap`). Detections with ``masks`` on records with GT masks add
    ``"mask": {"AP", "AP50", "AP75", "AR100"}`` (class-agnostic COCO mask AP, CutLER's protocol).
    """
    records = list(records)
    gt = [r for r in records if r.has_gt]
    m = {"images": len(records), "detections": int(sum(len(d["scores"]) for d in detections)),
         "images_without_detections": sum(len(d["scores"]) == 0 for d in detections), "gt_images": len(gt),
         "ap_mode": mode if gt else None, "corloc": None, "corloc_hits": None, "corloc_total": None,
         "AP50": None, "AP": None, "AP75": None}
    if gt:
        ids = {int(r.coco_id) for r in gt}
        mine = [d for d in detections if int(d["image_id"]) in ids]
        c = corloc_top1(mine, gt)
        ap = evaluate_ap(gt, as_coco_results(mine), mode=mode, class_agnostic=True, voc_difficult=voc_difficult)
        m.update(corloc=c.corloc, corloc_hits=c.hits, corloc_total=c.total, AP50=ap["AP50"], AP=ap["AP"],
                 AP75=ap["AP75"], AR100=ap["AR100"], num_gt=ap["num_gt"])
        if any(d.get("masks") is not None for d in mine) and any(r.has_masks for r in gt):
            seg = evaluate_ap(gt, as_coco_results(mine), mode=mode, class_agnostic=True, voc_difficult=voc_difficult,
                              iou_type="segm")
            m["mask"] = {k: seg[k] for k in SUMMARY_KEYS}
    return m
