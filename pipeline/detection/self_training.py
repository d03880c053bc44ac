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


def next_round(model, previous: dict, root, *, score_threshold: float, iou_threshold: float = 0.5,
               max_per_image: int | None = 100, device: str = "cpu", batch_size: int = 2,
               progress: bool = False) -> dict:
    """The next round's pseudo-label file (a COCO dataset like ``pseudo_boxes.json``): ``model`` (the round's
    detector) predicts on the images of ``previous`` (its pseudo-label file, ``file_name`` under ``root``), and
    :func:`merge_round` keeps its confident predictions and adds back the objects they miss. Images mining failed
    on or missing on disk keep their previous objects; ``info.self_training`` says how many came from where."""
    from pipeline.artifacts import coco_boxes_dataset
    from pipeline.boxes import xywh_to_xyxy
    from pipeline.data.box_file import training_set_records
    from pipeline.detection.inference import predict, to_coco_results
    from pipeline.masks import rle_area

    records, _, _ = training_set_records(previous, root)
    results = to_coco_results(predict(model, records, device=device, batch_size=batch_size, progress=progress))
    merged = merge_round(results, previous["annotations"], score_threshold=score_threshold,
                         iou_threshold=iou_threshold, max_per_image=max_per_image)
    anns = []
    for a in merged:
        ann = {k: v for k, v in a.items() if k != "bbox"}
        ann["bbox_xyxy"] = xywh_to_xyxy([a["bbox"]])[0].tolist()
        if isinstance(a.get("segmentation"), dict):  # a mask's area is its pixels (a prediction has none yet)
            ann["area"] = float(rle_area(a["segmentation"]))
        anns.append(ann)
    counts = {s: sum(a["source"] == s for a in merged) for s in ("prediction", "previous")}
    info = {**previous.get("info", {}), "self_training": {"score_threshold": score_threshold,
                                                          "iou_threshold": iou_threshold, **counts}}
    return coco_boxes_dataset(previous["images"], anns, categories=previous.get("categories"), info=info)
