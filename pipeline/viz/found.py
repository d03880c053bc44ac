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
from pipeline.viz.cut import three_panels
from pipeline.viz.masks import PALETTE
from pipeline.viz.style import COMPONENT, GT, NEGATIVE, POSITIVE, PRED, SEED, ZERO, Key
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
    return three_panels(image, result, patch_size, gt_boxes, title, found_map(result),
                        (result.bkg_mask, "background"), found_keys(result, gt_boxes))
