"""Pictures of detections: the image, its top detections (red, with scores) and GT boxes (green).

(Pictures live in viz/ with the mining pictures: shared colours, fonts and one ``save_png``.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.images import decode_rgb
from pipeline.viz.style import GT, PRED, draw_title, font_for, save_png


def draw_detections(image: np.ndarray, boxes, scores, gt_boxes=None, *, min_score: float = 0.3,
                    max_boxes: int = 10, title: str = "") -> Image.Image:
    """Draw up to ``max_boxes`` detections scoring >= ``min_score`` (always the top one) over ``image``."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    d = ImageDraw.Draw(pil)
    for b in np.asarray(gt_boxes if gt_boxes is not None else np.zeros((0, 4)), dtype=float).reshape(-1, 4):
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=GT, width=2)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:max_boxes]
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    for rank, i in enumerate(order):
        if rank > 0 and scores[i] < min_score:
            break
        b = boxes[i]
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=PRED, width=3 if rank == 0 else 1)
        d.text((b[0] + 3, b[1] + 2), f"{scores[i]:.2f}", fill=PRED, font=font_for("0.00", 11))
    return draw_title(pil, title)


def write_detection_pictures(detections: Sequence[dict], records: Sequence, out_dir: str | os.PathLike, *,
                             num_images: int = 8, min_score: float = 0.3, note: str = "") -> list[Path]:
    """``<out_dir>/<image_id>.png`` for the first ``num_images`` records that have detections; ``note``
    (e.g. "RANDOM WEIGHTS") is appended to each title."""
    by_id = {int(d["image_id"]): d for d in detections}
    paths = []
    for r in records:
        if len(paths) >= num_images:
            break
        d = by_id.get(int(r.coco_id))
        if d is None:
            continue
        title = f"{r.image_id}  {note}".strip()
        pic = draw_detections(decode_rgb(r.path), d["boxes"], d["scores"], r.boxes if r.has_gt else None,
                              min_score=min_score, title=title)
        safe = str(r.image_id).replace("/", "_").replace(os.sep, "_")
        paths.append(save_png(pic, Path(out_dir) / f"{safe}.png", title=title))
    return paths
