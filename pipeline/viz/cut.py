"""Pictures of a TokenCut / MaskCut result: boxes, the eigenvector heat map and the bipartition, side by side.

Each panel keeps a readable size: an image whose shorter side is under ``MIN_PANEL`` pixels is enlarged by
a whole factor with nearest-neighbour (patches stay sharp squares; boxes are drawn after enlarging, so lines
stay thin), a larger one keeps its size. The report shows pictures in a fixed width, where three panels of
a small image would otherwise be a few dozen pixels each. A legend line says what the colours mean.

Drawing only (``save_png`` is re-exported from :mod:`pipeline.viz.mining` for callers that write).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pipeline.viz.boxes import draw_boxes
from pipeline.viz.masks import PALETTE, tint_masks
from pipeline.viz.mining import (EXPANSION, PRED, SEED, _patch_grid_mask, draw_box_and_gt, line_width,
                                 mining_keys, mining_overlay, save_png, scale_boxes, upsample_grid, zoom_image)
from pipeline.viz.style import EXPANSION as EXPANSION_RGB
from pipeline.viz.style import NEGATIVE as NEGATIVE_RGB
from pipeline.viz.style import POSITIVE as POSITIVE_RGB
from pipeline.viz.style import ZERO, Key, draw_title, finish_picture

__all__ = ["draw_cut", "eigvec_heatmap", "panel_zoom", "save_png"]

NEGATIVE = np.array(NEGATIVE_RGB, dtype=np.float32)   # eigenvector < 0 (background side)
POSITIVE = np.array(POSITIVE_RGB, dtype=np.float32)   # eigenvector > 0 (object side)
GAP = 6
MIN_PANEL = 224   # pixels on a panel's shorter side (the input size of the backbones)
MAX_PANEL = 2048  # never enlarged past this on the longer side (a 1 x 1000 image stays a strip)


def panel_zoom(h: int, w: int) -> int:
    """The whole factor that enlarges an h x w image to at least ``MIN_PANEL`` on its shorter side (1 when it
    already is: never shrunk), limited so that the longer side stays within ``MAX_PANEL``."""
    need = math.ceil(MIN_PANEL / max(1, min(h, w)))
    return max(1, min(need, MAX_PANEL // max(1, h, w)))


def eigvec_heatmap(eigvec: np.ndarray, patch_size: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 diverging map of an (h, w) eigenvector: blue < 0 < red, white at 0, scaled by
    max |v| (all white when the vector is zero, e.g. the degenerate fallback; NaN/inf count as 0)."""
    v = np.nan_to_num(np.asarray(eigvec, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(np.abs(v).max()) if v.size else 0.0
    t = v / scale if scale > 0 else np.zeros_like(v)
    t = upsample_grid(t, patch_size, *size)[..., None].astype(np.float32)
    white = np.array(ZERO, dtype=np.float32)
    rgb = np.where(t >= 0, white + t * (POSITIVE - white), white - t * (NEGATIVE - white))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def cut_keys(result, gt_boxes=None) -> list[Key]:
    """The legend of a cut picture: the eigenvector's colour scale, the foreground side, then what the
    mining overlay shows (seed, component, box, GT)."""
    more = [Key(PALETTE[0], "masks 2, 3, ...")] if len(getattr(result, "masks", None) or []) > 1 else []
    return [Key(NEGATIVE_RGB, "eigvec < 0"), Key(ZERO, "0"), Key(POSITIVE_RGB, "> 0 (object side)"),
            Key(EXPANSION_RGB, "foreground side"), *mining_keys(result, gt_boxes), *more]


def boxes_panel(image: np.ndarray, result, patch_size: int, gt_boxes, k: int) -> tuple[Image.Image, int]:
    """The first panel of a several-box picture, ``image`` enlarged ``k`` times: the first box red with its mask
    (:func:`pipeline.viz.mining.mining_overlay`: the rest dimmed, the seed patch yellow), later boxes numbered in
    rank order with their masks translucent in a colour each, GT boxes green; and how many boxes were not drawn."""
    H, W = image.shape[:2]
    Hk, Wk, patch = H * k, W * k, patch_size * k
    lw = line_width(Hk, Wk)
    left, skipped = mining_overlay(image, result, patch_size, gt_boxes, zoom=k)
    later = list(getattr(result, "boxes", [result.box]))[1:]
    later_masks = list(getattr(result, "masks", None) or [])[1:]
    if later_masks:  # the later objects' masks, translucent, a colour each (the first is the component)
        tinted = np.asarray(left).astype(np.float32)
        tint_masks(tinted, [upsample_grid(np.asarray(m, dtype=bool), patch, Hk, Wk) for m in later_masks],
                   outline=max(1, lw // 2))
        left = Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8))
    skipped += draw_boxes(left, scale_boxes(later, k), PRED, lw,
                          labels=[str(rank) for rank in range(2, len(later) + 2)], label_colour=SEED)
    return left, skipped


def draw_cut(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Three panels of ``image`` (H, W, 3 uint8), each enlarged by :func:`panel_zoom`, left to right:

    * the boxes (first box red as in :func:`pipeline.viz.mining.draw_mining`, with its mask tinted and
      its seed patch in yellow; later boxes numbered in rank order, their masks translucent in a colour
      each) and GT boxes (green);
    * the eigenvector of the first cut (``result.eigvec``) as a heat map (red = object side);
    * the bipartition (``result.bipartition``, blue tint) with the first object's mask outlined by
      its box;

    then the title and a legend line (:func:`pipeline.viz.style.finish_picture`). Any image size and any
    box can be drawn; the legend counts the boxes that could not be (those of the first panel).
    """
    return three_panels(image, result, patch_size, gt_boxes, title, (result.eigvec, "eigenvector"),
                        (result.bipartition, "bipartition"), cut_keys(result, gt_boxes))


def three_panels(image: np.ndarray, result, patch_size: int, gt_boxes, title: str, heat: tuple, region: tuple,
                 keys) -> Image.Image:
    """The layout of a cut picture and of a FOUND picture: the boxes (:func:`boxes_panel`); ``heat`` = (an (h, w)
    map, its caption) as a heat map; ``region`` = (an (h, w) patch mask, its caption) tinted, with the seed patch
    and the first box; then the title and the legend ``keys``."""
    H, W = image.shape[:2]
    k = panel_zoom(H, W)
    Hk, Wk, patch = H * k, W * k, patch_size * k
    lw = line_width(Hk, Wk)
    left, skipped = boxes_panel(image, result, patch_size, gt_boxes, k)
    heat_panel = draw_title(Image.fromarray(eigvec_heatmap(heat[0], patch, (Hk, Wk))), heat[1])

    img = zoom_image(image, k).astype(np.float32)
    mask = upsample_grid(np.asarray(region[0], dtype=bool), patch, Hk, Wk)
    img[mask] = 0.45 * img[mask] + 0.55 * EXPANSION
    img[upsample_grid(_patch_grid_mask([result.seed], np.shape(region[0])), patch, Hk, Wk)] = SEED
    part = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw_box_and_gt(part, scale_boxes(result.box, k), scale_boxes(gt_boxes, k), lw)  # counted on the left
    draw_title(part, region[1])

    sheet = Image.new("RGB", (3 * Wk + 2 * GAP, Hk), (24, 24, 24))
    for i, panel in enumerate((left, heat_panel, part)):
        sheet.paste(panel, (i * (Wk + GAP), 0))
    return finish_picture(sheet, title, keys, skipped, title_room=Wk)
