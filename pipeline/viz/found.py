"""Pictures of a FOUND result: the boxes, the map they were thresholded from, and the background, side by side.

Panels as the cut pictures (:mod:`pipeline.viz.cut`: each enlarged by a whole factor to a readable size):

* the boxes (first box red with its component, the background seed patch yellow, later boxes numbered with
  their masks tinted) and GT boxes (green);
* the map the object mask is thresholded from, on a diverging scale (red = object side, white = the
  threshold, blue = background side): with a head ``sigmoid - 0.5``, without one ``bkg_th - similarity to the
  seed``;
* the background (patches similar to the seed, blue tint) with the seed and the first box.

Drawing only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.viz.boxes import as_boxes
from pipeline.viz.cut import GAP, boxes_panel, eigvec_heatmap, panel_zoom
from pipeline.viz.masks import PALETTE
from pipeline.viz.mining import (EXPANSION, _patch_grid_mask, draw_box_and_gt, line_width, scale_boxes,
                                 upsample_grid, zoom_image)
from pipeline.viz.style import COMPONENT, GT, NEGATIVE, POSITIVE, PRED, SEED, ZERO, Key, draw_title, finish_picture
from pipeline.viz.style import EXPANSION as EXPANSION_RGB

__all__ = ["draw_found", "found_map"]


def found_map(result) -> tuple[np.ndarray, str]:
    """The (h, w) map the object mask was thresholded from, centred on its threshold (> 0: object), and its
    panel title."""
    if getattr(result, "saliency", None) is not None:
        return np.asarray(result.saliency, dtype=np.float64) - 0.5, "head: sigmoid - 0.5"
    th = float(getattr(result, "bkg_th", 0.3))
    return th - np.asarray(result.similarity, dtype=np.float64), f"{th:g} - similarity to seed"


def found_keys(result, gt_boxes=None) -> list[Key]:
    keys = [Key(NEGATIVE, "background side"), Key(ZERO, "threshold"), Key(POSITIVE, "object side"),
            Key(EXPANSION_RGB, "background"), Key(SEED, "background seed", 2), Key(COMPONENT, "component", 1),
            Key(PRED, "box", 2)]
    if len(as_boxes(gt_boxes)):
        keys.append(Key(GT, "GT", 2))
    if len(getattr(result, "masks", None) or []) > 1:
        keys.append(Key(PALETTE[0], "masks 2, 3, ..."))
    return keys


def draw_found(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Three panels of ``image`` (H, W, 3 uint8) for a :class:`pipeline.discovery.found.FoundResult` (module
    docstring), the title and a legend line. Any image size and any box can be drawn."""
    H, W = image.shape[:2]
    k = panel_zoom(H, W)
    Hk, Wk, patch = H * k, W * k, patch_size * k
    lw = line_width(Hk, Wk)
    left, skipped = boxes_panel(image, result, patch_size, gt_boxes, k)

    values, caption = found_map(result)
    heat = draw_title(Image.fromarray(eigvec_heatmap(values, patch, (Hk, Wk))), caption)

    img = zoom_image(image, k).astype(np.float32)
    bkg = upsample_grid(np.asarray(result.bkg_mask, dtype=bool), patch, Hk, Wk)
    img[bkg] = 0.45 * img[bkg] + 0.55 * EXPANSION
    img[upsample_grid(_patch_grid_mask([result.seed], np.shape(result.bkg_mask)), patch, Hk, Wk)] = SEED
    back = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw_box_and_gt(back, scale_boxes(result.box, k), scale_boxes(gt_boxes, k), lw)  # counted on the left
    draw_title(back, "background")

    sheet = Image.new("RGB", (3 * Wk + 2 * GAP, Hk), (24, 24, 24))
    for i, panel in enumerate((left, heat, back)):
        sheet.paste(panel, (i * (Wk + GAP), 0))
    return finish_picture(sheet, title, found_keys(result, gt_boxes), skipped, title_room=Wk)
