"""The boxes to cluster, as a COCO dataset: LOST pseudo-boxes as they are, or thresholded detections."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.artifacts import coco_boxes_dataset
from pipeline.boxes import xywh_to_xyxy
from pipeline.data.records import ImageRecord


def detections_to_boxes(results: Sequence[dict], records: Iterable[ImageRecord], image_root: str | Path,
                        score_threshold: float, info: dict | None = None) -> dict:
    """COCO results (``image_id`` = record ``coco_id``, ``bbox`` xywh, ``score``) -> a COCO dataset of the
    detections scoring ``>= score_threshold``, file names relative to ``image_root``.

    Annotations keep ``score`` and the detector's ``category_id`` as ``source_category_id``; their
    own category is 1 (``object``). Images without a kept detection stay in ``images``.
    """
    if not isinstance(results, list):
        raise ValueError("expected a COCO results list [{image_id, bbox, score, ...}, ...]")
    records = list(records)
    by_coco = {int(r.coco_id): r for r in records}
    images = [{"id": int(r.coco_id), "file_name": os.path.relpath(r.path, image_root),
               "width": r.width, "height": r.height, "dataset_id": r.image_id} for r in records]
    anns = []
    for i, d in enumerate(results):
        if not {"image_id", "bbox", "score"} <= set(d):
            raise ValueError(f"detection #{i} is not in COCO results format (needs image_id, bbox [x, y, w, h], "
                             "score): is this the class-agnostic detector's detections file?")
        if int(d["image_id"]) not in by_coco:
            raise ValueError(f"detection #{i} has image_id {d['image_id']}, which is not in the dataset: the "
                             "detections were made on another dataset or split.")
        if float(d["score"]) >= score_threshold:
            anns.append({"image_id": int(d["image_id"]), "bbox_xyxy": xywh_to_xyxy([d["bbox"]])[0].tolist(),
                         "category_id": 1, "score": float(d["score"]),
                         "source_category_id": int(d.get("category_id", 1))})
    if results and not anns:
        best = max(float(d["score"]) for d in results)
        raise ValueError(f"it holds {len(results):,} detections, but none scores >= score_threshold={score_threshold} "
                         f"(the best scores {best:.2f}): lower score_threshold")
    meta = {"description": f"detections with score >= {score_threshold}", "score_threshold": score_threshold,
            "image_root": str(image_root), **(info or {})}
    return coco_boxes_dataset(images, anns, info=meta)
