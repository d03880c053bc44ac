"""PASCAL VOC average precision, as the VOC devkit / detectron2 / LOST's Hungarian script compute it.

Protocol for one GT class and one set of scored detections:
- detections are taken by decreasing score (stable sort: equal scores keep input order, image by
  image; the reference's unstable ``argsort`` leaves such ties unspecified);
- each detection looks at all GT boxes of the class in its image and takes the one of highest IoU
  (first on ties); if that IoU is ``> iou_threshold`` (strictly, as the devkit) the detection is
  ignored when that GT is difficult (or crowd), a TP when the GT is still free, a FP otherwise;
  below the threshold it is a FP;
- recall = TP / number of non-difficult GT; AP = area under the monotone precision envelope over all
  recall points (``use_07_metric``: the 11-point VOC2007 average instead).

IoU: the devkit adds ``+1`` to widths because its boxes are inclusive integer pixels shifted by one.
Our boxes are continuous (x2/y2 exclusive, VOC xmin/ymin already shifted by -1, see
``pipeline.data.records``), so no ``+1`` is needed and the IoU equals the devkit's exactly.
A class without any non-difficult GT box has an undefined AP: ``nan``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import numpy as np

from pipeline.boxes import iou_matrix
from pipeline.data.records import ImageRecord


def ap_from_pr(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from recall/precision arrays (in detection order)."""
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if use_07_metric:
        return float(sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in np.linspace(0, 1, 11)) / 11)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass
class GroundTruth:
    """All GT boxes of a dataset, flattened: box ``g`` is in image ``image[g]`` with class ``cls[g]``."""

    image_ids: list[str]
    class_names: list[str]
    boxes: np.ndarray
    image: np.ndarray
    cls: np.ndarray
    ignore: np.ndarray

    @classmethod
    def from_records(cls, records: Iterable[ImageRecord] | Mapping[str, ImageRecord],
                     class_names: list[str] | None = None) -> "GroundTruth":
        recs = list(records.values()) if isinstance(records, Mapping) else list(records)
        if class_names is None:
            class_names = sorted({c for r in recs for c in r.classes})
        cidx = {c: i for i, c in enumerate(class_names)}
        boxes, image, clss, ignore = [], [], [], []
        for i, r in enumerate(recs):
            for b, c, d, cr in zip(r.boxes, r.classes, r.difficult, r.crowd):
                if c not in cidx:
                    continue  # a class outside the evaluated vocabulary
                boxes.append(b), image.append(i), clss.append(cidx[c]), ignore.append(bool(d or cr))
        return cls([r.image_id for r in recs], list(class_names),
                   np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(image, np.int64),
                   np.asarray(clss, np.int64), np.asarray(ignore, bool))

    def npos(self, class_idx: int) -> int:
        return int(((self.cls == class_idx) & ~self.ignore).sum())


@dataclass
class DetectionOverlaps:
    """Scored detections sorted by decreasing score, with their IoU to every GT box of their image.

    ``pairs`` rows are ``(detection, gt)`` with ``iou[p] > 0``; computed once, reused for every
    class and threshold.
    """

    scores: np.ndarray
    pair_det: np.ndarray
    pair_gt: np.ndarray
    pair_iou: np.ndarray

    @classmethod
    def build(cls, gt: GroundTruth, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> "DetectionOverlaps":
        """``image[d]`` indexes ``gt.image_ids``; ``boxes`` (n, 4) xyxy; ``scores`` (n,)."""
        image = np.asarray(image, np.int64)
        scores = np.asarray(scores, np.float64)
        order = np.argsort(-scores, kind="stable")
        image, boxes, scores = image[order], np.asarray(boxes, np.float64).reshape(-1, 4)[order], scores[order]
        gt_of_image: dict[int, np.ndarray] = {}
        for g, im in enumerate(gt.image):
            gt_of_image.setdefault(int(im), []).append(g)
        dets, gts, ious = [], [], []
        for im in np.unique(image):
            g = gt_of_image.get(int(im))
            if g is None:
                continue
            d = np.flatnonzero(image == im)
            g = np.asarray(g)
            m = iou_matrix(boxes[d], gt.boxes[g])
            di, gi = np.nonzero(m > 0)
            dets.append(d[di]), gts.append(g[gi]), ious.append(m[di, gi])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(scores, cat(dets, np.int64), cat(gts, np.int64), cat(ious, np.float64))


def class_ap(gt: GroundTruth, overlaps: DetectionOverlaps, class_idx: int, iou_threshold: float = 0.5,
             use_07_metric: bool = False) -> float:
    """VOC AP (0..1) of the detections of ``overlaps`` scored as GT class ``class_idx``."""
    npos = gt.npos(class_idx)
    if npos == 0:
        return float("nan")
    n = len(overlaps.scores)
    if n == 0:
        return 0.0
    keep = gt.cls[overlaps.pair_gt] == class_idx
    det, g, iou = overlaps.pair_det[keep], overlaps.pair_gt[keep], overlaps.pair_iou[keep]
    # best GT per detection: highest IoU, then lowest GT index (= first in the image's GT order)
    order = np.lexsort((g, -iou, det))
    det, g, iou = det[order], g[order], iou[order]
    first = np.ones(len(det), bool)
    first[1:] = det[1:] != det[:-1]
    det, g, iou = det[first], g[first], iou[first]
    hit = iou > iou_threshold
    tp, fp = np.zeros(n), np.ones(n)
    used = set()
    for d, j in zip(det[hit], g[hit]):  # det is increasing = decreasing score
        if gt.ignore[j]:
            fp[d] = 0.0
        elif j in used:
            pass  # duplicate: stays a FP
        else:
            used.add(int(j))
            tp[d], fp[d] = 1.0, 0.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ap_from_pr(rec, prec, use_07_metric)


DIFFICULT_MODES = ("ignore", "remove")


def apply_difficult(records: Iterable[ImageRecord], mode: str = "ignore",
                    crowd_is_difficult: bool = False) -> list[ImageRecord]:
    """The records as an evaluation should see their difficult objects.

    ``mode="ignore"`` (the VOC devkit's rule, the default of every VOC AP here): difficult boxes stay,
    flagged; a detection on one is neither TP nor FP and they do not count in the recall.
    ``mode="remove"`` (LOST's ``prepare_voc_data_in_coco_style.py``, ``voc_difficult=remove`` of the
    class-agnostic AP): they are deleted from the GT, so a detection on one is a false positive.
    Difficult = the record's ``difficult`` flag (VOC ``<difficult>1</difficult>``, a COCO annotation's
    ``"difficult": 1`` or ``"ignore": 1``); with ``crowd_is_difficult`` also its ``crowd`` flag (for COCO
    files that mark VOC difficult objects ``"iscrowd": 1``). Crowd boxes that are not taken as
    difficult stay ignore regions in both modes. The input records are not modified.
    """
    if mode not in DIFFICULT_MODES:
        raise ValueError(f"voc_difficult must be one of {DIFFICULT_MODES}, got {mode!r}")
    out = []
    for r in records:
        diff = np.asarray(r.difficult, bool) | (np.asarray(r.crowd, bool) if crowd_is_difficult else False)
        crowd = np.asarray(r.crowd, bool) & ~diff
        if mode == "remove":
            keep = ~diff
            out.append(replace(r, boxes=r.boxes[keep], classes=[c for c, k in zip(r.classes, keep) if k],
                               difficult=np.zeros(int(keep.sum()), bool), crowd=crowd[keep],
                               segmentations=[g for g, k in zip(r.segmentations, keep) if k]))
        else:
            out.append(replace(r, boxes=r.boxes.copy(), classes=list(r.classes), difficult=diff, crowd=crowd))
    return out


def voc_ap(
    records: Iterable[ImageRecord] | Mapping[str, ImageRecord],
    detections: Mapping[str, Mapping[str, np.ndarray]],
    class_name: str,
    label=None,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> float:
    """VOC AP (0..1) for GT class ``class_name`` of the detections whose label is ``label`` (all if None).

    ``detections``: ``{image_id: {"boxes": (n, 4) xyxy, "scores": (n,), "labels": (n,)}}`` keyed by
    ``ImageRecord.image_id``.
    """
    gt = GroundTruth.from_records(records)
    if class_name not in gt.class_names:
        gt = GroundTruth.from_records(records, gt.class_names + [class_name])
    image, boxes, scores = flatten_detections(gt, detections, label)
    ov = DetectionOverlaps.build(gt, image, boxes, scores)
    return class_ap(gt, ov, gt.class_names.index(class_name), iou_threshold, use_07_metric)


def flatten_detections(gt: GroundTruth, detections: Mapping[str, Mapping[str, np.ndarray]], label=None):
    """Concatenate per-image detections (optionally only ``label``) into (image index, boxes, scores)."""
    pos = {im: i for i, im in enumerate(gt.image_ids)}
    unknown = [k for k in detections if k not in pos]
    if unknown:
        raise ValueError(f"{len(unknown)} detection images are not in the ground truth (e.g. {unknown[:3]}): "
                         "the detections and the dataset do not match.")
    image, boxes, scores = [], [], []
    for im, det in detections.items():
        b = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        s = np.asarray(det["scores"], np.float64).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"image {im!r}: {len(b)} detection boxes but {len(s)} scores")
        if label is not None:
            m = np.asarray(det["labels"]).reshape(-1) == label
            b, s = b[m], s[m]
        image.append(np.full(len(b), pos[im], np.int64)), boxes.append(b), scores.append(s)
    if not image:
        return np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
    return np.concatenate(image), np.concatenate(boxes), np.concatenate(scores)
