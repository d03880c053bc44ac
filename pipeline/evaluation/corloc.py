"""CorLoc: the percentage of images whose single predicted box hits a ground-truth box.

Scored as LOST scores it: a hit is IoU >= ``iou_threshold`` (0.5) with ANY GT box of the image,
difficult boxes included; COCO crowd boxes are dropped first (LOST's ``extract_gt_COCO``); GT
coordinates are rounded to integers (``int(round())``, as LOST does for COCO; VOC's are integers
already). A missing or None prediction (e.g. a corrupt image) is a miss and stays in the
denominator. Images without any GT box left (none annotated, or all crowd) are skipped: LOST
discards them (its ``no_hard`` path) and its IoU would be undefined; they are listed in ``skipped``.
Records with ``has_gt=False`` are skipped too; when nothing has GT, ``corloc`` is None.

A detector's CorLoc (LOST+CAD) scores its top-scoring box per image: :func:`top1_boxes` (an image
without detections is a miss) and :func:`corloc_top1`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.boxes import iou_matrix
from pipeline.data.records import ImageRecord


@dataclass
class CorLocResult:
    corloc: float | None  # percent, None when no record has GT
    hits: int
    total: int
    per_image: dict[str, bool] = field(default_factory=dict)
    ious: dict[str, float] = field(default_factory=dict)  # best IoU per scored image (0 if no prediction)
    skipped: list[str] = field(default_factory=list)  # image ids left out of the denominator

    def __str__(self) -> str:
        return "corloc: n/a (no ground truth)" if self.corloc is None else \
            f"corloc: {self.corloc:.2f} ({self.hits}/{self.total})"


def scoring_gt(record: ImageRecord) -> np.ndarray:
    """The GT boxes CorLoc compares against: crowd dropped, coordinates rounded to integers."""
    keep = ~np.asarray(record.crowd, bool) if len(record.crowd) else np.ones(len(record.boxes), bool)
    return np.array([[int(round(float(v))) for v in b] for b in record.boxes[keep]], dtype=np.float64).reshape(-1, 4)


def _pred_box(image_id: str, box) -> np.ndarray | None:
    if box is None:
        return None
    b = np.asarray(box, dtype=np.float64)
    if b.size == 0:
        return None
    if b.size != 4:
        raise ValueError(f"CorLoc scores one box per image; image {image_id!r} has a prediction of shape "
                         f"{b.shape}: pass its single (top) box as [x1, y1, x2, y2]")
    b = b.reshape(4)
    return b if np.isfinite(b).all() else None


def corloc(pred_boxes: dict[str, np.ndarray | None], records: list[ImageRecord],
           iou_threshold: float = 0.5) -> CorLocResult:
    """CorLoc of ``pred_boxes`` (image_id -> xyxy box or None) over ``records``."""
    ids = {r.image_id for r in records}
    if pred_boxes and not ids.intersection(pred_boxes):
        some_pred, some_id = next(iter(pred_boxes)), next(iter(ids), None)
        raise ValueError(f"no prediction key matches an image id (prediction keys look like {some_pred!r}, "
                         f"image ids like {some_id!r}): key predictions by ImageRecord.image_id")
    per_image: dict[str, bool] = {}
    ious: dict[str, float] = {}
    skipped: list[str] = []
    for r in records:
        gt = scoring_gt(r) if r.has_gt else np.zeros((0, 4))
        if len(gt) == 0:
            skipped.append(r.image_id)
            continue
        box = _pred_box(r.image_id, pred_boxes.get(r.image_id))
        best = float(iou_matrix(box[None], gt).max()) if box is not None else 0.0
        ious[r.image_id] = best
        per_image[r.image_id] = box is not None and best >= iou_threshold
    total = len(per_image)
    hits = int(sum(per_image.values()))
    value = 100.0 * hits / total if total else None
    return CorLocResult(corloc=value, hits=hits, total=total, per_image=per_image, ious=ious, skipped=skipped)


# --------------------------------------------------------------------------- a detector's top-1 box
def top1_boxes(detections: Sequence[dict]) -> dict[int, np.ndarray | None]:
    """The top-scoring box of each image (LOST+CAD's box); ``None`` when the detector found nothing.

    ``detections``: per-image dicts ``{"image_id": int, "boxes": (n, 4) xyxy, "scores": (n,)}``.
    Ties are broken stably by score: among detections of equal (maximal) score, the first one in the
    image's list wins (``np.argmax`` returns the first maximum), whatever order the scores came in.
    """
    out: dict[int, np.ndarray | None] = {}
    for d in detections:
        scores = np.asarray(d["scores"], dtype=np.float64).reshape(-1)
        if len(scores) == 0:
            out[int(d["image_id"])] = None
        else:
            out[int(d["image_id"])] = np.asarray(d["boxes"][int(np.argmax(scores))], dtype=np.float64)
    return out


def corloc_top1(detections: Sequence[dict], records: Sequence[ImageRecord],
                iou_threshold: float = 0.5) -> CorLocResult:
    """LOST+CAD CorLoc: each image's top-scoring detection (:func:`top1_boxes`; none = a miss) scored by
    :func:`corloc` (IoU >= ``iou_threshold`` with any GT box). ``image_id`` of the detections is the
    records' ``coco_id``; every record needs a detections entry (possibly empty)."""
    top = top1_boxes(detections)
    by_coco = {int(r.coco_id): r.image_id for r in records}
    missing = [r.image_id for r in records if int(r.coco_id) not in top]
    if missing:
        raise ValueError(f"no detections entry for {len(missing)} image(s) (e.g. {missing[:3]}): run the detector "
                         "on every image of the mined set")
    return corloc({by_coco[i]: b for i, b in top.items() if i in by_coco}, list(records), iou_threshold)
