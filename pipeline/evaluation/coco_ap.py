"""Detection AP with pycocotools against the ground truth of :class:`ImageRecord` lists.

``mode="coco"``: every GT box counts, crowd boxes are COCO crowd regions (a detection on them is
neither TP nor FP). ``mode="voc"``: VOC07-test style for class-agnostic detection, as LOST's
reference evaluation (``prepare_voc_data_in_coco_style.py``) does it: difficult objects are
*removed* from the GT (``voc_difficult="remove"``, the default; a detection on a difficult object
is then a false positive). ``voc_difficult="ignore"`` instead marks them ``iscrowd=1`` so that
pycocotools ignores detections on them (crowd matching: intersection over detection area), which
is closer to the VOC devkit's own rule. The metric is COCO's: 101-point interpolated precision,
at most 100 detections per image, IoU 0.50 (``AP50``) and 0.50:0.95 (``AP``); numbers in percent.

``class_agnostic=True`` maps every GT box and every detection to one category ``object``.

``iou_type="segm"``: mask AP (pycocotools' ``segm``), detections with a ``segmentation`` (COCO RLE) against the
records' GT masks (``ImageRecord.segmentations``; an object without a mask counts with its box as a rectangle).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

from pipeline.boxes import xyxy_to_xywh

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _box_polygon(x: float, y: float, w: float, h: float) -> list:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def build_coco_gt(records: Sequence, *, mode: str = "voc", class_agnostic: bool = True,
                  class_names: Sequence[str] | None = None, voc_difficult: str = "remove",
                  masks: bool = False) -> dict:
    """A COCO GT dataset dict from records (image ids = ``coco_id``; category ids 1..C in
    ``class_names`` order, or a single ``object`` category when class-agnostic); with ``masks`` every
    annotation has its ``segmentation``."""
    if mode not in ("voc", "coco"):
        raise ValueError(f"AP mode must be 'voc' or 'coco', got {mode!r}")
    if voc_difficult not in ("remove", "ignore"):
        raise ValueError(f"voc_difficult must be 'remove' or 'ignore', got {voc_difficult!r}")
    no_gt = [r.image_id for r in records if not r.has_gt]
    if no_gt:
        raise ValueError(f"AP needs ground truth but {len(no_gt)} image(s) have none (e.g. {no_gt[:3]}): "
                         "evaluate on a labelled dataset (VOC or COCO), not an image folder")
    if class_agnostic:
        cats, cat_of = [{"id": 1, "name": "object"}], (lambda c: 1)
    else:
        names = list(class_names) if class_names else sorted({c for r in records for c in r.classes})
        index = {n: i + 1 for i, n in enumerate(names)}
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]

        def cat_of(c):
            if c not in index:
                raise ValueError(f"GT class {c!r} is not in class_names {names}")
            return index[c]
    images, anns = [], []
    for r in records:
        images.append({"id": int(r.coco_id), "file_name": str(r.path), "width": int(r.width or 0),
                       "height": int(r.height or 0)})
        segs = r.segmentations or [None] * len(r.boxes)
        for box, cls, diff, crowd, seg in zip(xyxy_to_xywh(r.boxes), r.classes, r.difficult, r.crowd, segs):
            iscrowd = bool(crowd)
            if mode == "voc" and diff:
                if voc_difficult == "remove":
                    continue
                iscrowd = True
            x, y, w, h = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": int(r.coco_id), "category_id": cat_of(cls),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(iscrowd)})
            if masks:
                anns[-1]["segmentation"] = seg if seg is not None else _box_polygon(x, y, w, h)
    return {"images": images, "annotations": anns, "categories": cats}


def evaluate_ap(records: Sequence, results: Sequence[dict], *, mode: str = "voc", class_agnostic: bool = True,
                class_names: Sequence[str] | None = None, voc_difficult: str = "remove",
                per_category: bool = False, iou_type: str = "bbox") -> dict:
    """AP of COCO-format ``results`` (``image_id`` = record ``coco_id``) against ``records``' GT: of their boxes
    (``iou_type="bbox"``) or of their masks (``"segm"``: results carry a ``segmentation``).

    Returns ``{"AP50", "AP", "AP75", ..., "num_images", "num_gt", "num_detections", "summary"}``
    (numbers in percent; ``summary`` is pycocotools' printed table) and, with ``per_category``,
    ``"per_category": {name: {"AP50", "AP"}}``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    segm = iou_type == "segm"
    if segm and not any(getattr(r, "has_masks", False) for r in records):
        raise ValueError("mask AP needs ground-truth masks, but no image has any (COCO instances have them; VOC "
                         "boxes do not)")
    gt = build_coco_gt(records, mode=mode, class_agnostic=class_agnostic, class_names=class_names,
                       voc_difficult=voc_difficult, masks=segm)
    img_ids = {im["id"] for im in gt["images"]}
    res = [dict(d, category_id=1) if class_agnostic else dict(d) for d in results]
    stray = sorted({int(d["image_id"]) for d in res} - img_ids)
    if stray:
        raise ValueError(f"{len(stray)} detection image id(s) are not in the evaluated dataset (e.g. {stray[:5]}): "
                         "detections and ground truth must come from the same dataset")
    out = {"mode": mode, "class_agnostic": class_agnostic, "iou_type": iou_type, "num_images": len(img_ids),
           "num_gt": sum(1 for a in gt["annotations"] if not a["iscrowd"]), "num_detections": len(res)}
    if not res or not out["num_gt"]:
        out.update({k: 0.0 for k in STAT_NAMES})
        out["summary"] = "no detections" if not res else "no ground-truth boxes"
        return out
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([_result(d, segm) for d in res])
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        start = buf.tell()
        ev.summarize()
    out.update({k: float(max(v, 0.0) * 100.0) for k, v in zip(STAT_NAMES, ev.stats)})
    out["summary"] = buf.getvalue()[start:].strip()
    if per_category:
        prec = ev.eval["precision"]  # (T iou, R recall, K cat, A area, M maxdets)
        out["per_category"] = {}
        for k, cat in enumerate(gt["categories"]):
            p = prec[:, :, k, 0, -1]
            ap = float(np.mean(p[p > -1])) * 100 if (p > -1).any() else float("nan")
            p50 = prec[0, :, k, 0, -1]
            ap50 = float(np.mean(p50[p50 > -1])) * 100 if (p50 > -1).any() else float("nan")
            out["per_category"][cat["name"]] = {"AP50": ap50, "AP": ap}
    return out


def _result(d: dict, segm: bool) -> dict:
    """One detection as pycocotools' ``loadRes`` takes it: for masks the segmentation alone (it derives the box
    and area from it), else the box as floats."""
    if segm:
        if "segmentation" not in d:
            raise ValueError(f"a detection of image {d.get('image_id')} has no 'segmentation': mask AP needs "
                             "the mask of every detection")
        return {k: v for k, v in d.items() if k not in ("bbox", "area")}
    return dict(d, bbox=[float(v) for v in d["bbox"]])


SUMMARY_KEYS = ("AP", "AP50", "AP75", "AR100")


def box_and_mask_ap(records: Sequence, results: Sequence[dict]) -> dict:
    """Class-agnostic COCO-style ``{"box_ap": {AP, AP50, AP75, AR100}, "mask": {...}}`` of ``results`` (each with
    ``bbox`` and ``segmentation``) against every GT object of ``records``, all categories merged into one."""
    out = {}
    for key, iou_type in (("box_ap", "bbox"), ("mask", "segm")):
        res = evaluate_ap(records, results, mode="coco", class_agnostic=True, iou_type=iou_type)
        out[key] = {k: round(res[k], 4) for k in SUMMARY_KEYS}
    return out
