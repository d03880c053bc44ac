"""Pictures of detections: the image, its top detections (red, with scores; the top one thicker; a mask
detector's masks translucent, a colour each) and GT boxes (green), with a legend line.

(Pictures live in viz/ with the mining pictures: shared colours, fonts and one ``save_png``.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import decode_rgb
from pipeline.masks import decode_rle
from pipeline.viz.boxes import as_boxes, draw_box, draw_boxes
from pipeline.viz.masks import PALETTE, tint_masks
from pipeline.viz.style import GT, PRED, Key, finish_picture, save_png


def draw_detections(image: np.ndarray, boxes, scores, gt_boxes=None, *, min_score: float = 0.3,
                    max_boxes: int = 10, title: str = "", masks: Sequence | None = None) -> Image.Image:
    """Draw up to ``max_boxes`` detections scoring >= ``min_score`` (always the top one, thicker) with their
    scores over ``image`` (and their ``masks``, RLE or arrays, one per detection, translucent), the GT boxes in
    green, the title and a legend line. Any box a model can give (sub-pixel, zero-size, inverted, outside,
    NaN/inf) on any image size is accepted (:mod:`pipeline.viz.boxes`), and any mask (empty, another size:
    counted); the legend counts those that could not be drawn."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = as_boxes(boxes)
    shown = []
    for rank, i in enumerate(np.argsort(-scores, kind="stable")[:max_boxes]):
        if rank > 0 and not scores[i] >= min_score:
            break
        shown.append(i)
    img, skipped = np.asarray(image, dtype=np.uint8), 0
    if masks is not None:
        tinted = img.astype(np.float32)
        skipped += tint_masks(tinted, [decode_rle(masks[i]) if isinstance(masks[i], dict) else masks[i]
                                       for i in shown])
        img = np.clip(tinted, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img).convert("RGB")
    skipped += draw_boxes(pil, gt_boxes, GT, 2)
    for rank, i in enumerate(shown):
        skipped += draw_box(pil, boxes[i], PRED, 3 if rank == 0 else 1, label=f"{scores[i]:.2f}") is None
    keys = [Key(PRED, "detection", 1), Key(PRED, "top box", 3)] + ([Key(PALETTE[0], "masks")] if masks is not None
                                                                    else [])
    if len(as_boxes(gt_boxes)):
        keys.append(Key(GT, "GT", 2))
    return finish_picture(pil, title, keys, skipped)


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
                              min_score=min_score, title=title, masks=d.get("masks"))
        safe = str(r.image_id).replace("/", "_").replace(os.sep, "_")
        paths.append(save_png(pic, Path(out_dir) / f"{safe}.png", title=title))
    return paths
