"""Pictures of a TokenCut / MaskCut result: boxes, the eigenvector heat map and the bipartition, side by side.

Drawing only (``save_png`` is re-exported from :mod:`pipeline.viz.mining` for callers that write).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.viz.mining import EXPANSION, PRED, SEED, _patch_grid_mask, draw_box_and_gt, draw_mining, save_png

__all__ = ["draw_cut", "eigvec_heatmap", "save_png"]

NEGATIVE = np.array([40, 90, 255], dtype=np.float32)   # eigenvector < 0 (background side)
POSITIVE = np.array([255, 60, 40], dtype=np.float32)   # eigenvector > 0 (object side)
GAP = 6


def _upsample(grid: np.ndarray, patch_size: int, h: int, w: int) -> np.ndarray:
    return np.kron(grid, np.ones((patch_size, patch_size), dtype=grid.dtype))[:h, :w]


def eigvec_heatmap(eigvec: np.ndarray, patch_size: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 diverging map of an (h, w) eigenvector: blue < 0 < red, white at 0, scaled by
    max |v| (all white when the vector is zero, e.g. the degenerate fallback)."""
    v = np.asarray(eigvec, dtype=np.float64)
    scale = float(np.abs(v).max()) if v.size else 0.0
    t = v / scale if scale > 0 else np.zeros_like(v)
    t = _upsample(t, patch_size, *size)[..., None].astype(np.float32)
    white = np.full(3, 255, dtype=np.float32)
    rgb = np.where(t >= 0, white + t * (POSITIVE - white), white - t * (NEGATIVE - white))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _label(pil: Image.Image, text: str) -> None:
    d = ImageDraw.Draw(pil)
    d.rectangle([0, 0, 8 + 7 * len(text), 16], fill=(0, 0, 0))
    d.text((4, 3), text, fill=(255, 255, 255))


def draw_cut(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Three panels of ``image`` (H, W, 3 uint8), left to right:

    * the boxes (first box red as in :func:`pipeline.viz.mining.draw_mining`, with its mask tinted and
      its seed patch in yellow; later boxes numbered in rank order, thinner) and GT boxes (green);
    * the eigenvector of the first cut (``result.eigvec``) as a heat map (red = object side);
    * the bipartition (``result.bipartition``, blue tint) with the first object's mask outlined by
      its box.
    """
    H, W = image.shape[:2]
    left = draw_mining(image, result, patch_size, gt_boxes=gt_boxes, title=title)
    d = ImageDraw.Draw(left)
    lw = max(2, round(min(H, W) / 150))
    boxes = list(getattr(result, "boxes", [result.box]))
    for rank, b in enumerate(boxes[1:], start=1):
        b = np.asarray(b).reshape(4)
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=PRED, width=lw)
        d.text((b[0] + 3, b[1] + 2), str(rank + 1), fill=SEED)

    heat = Image.fromarray(eigvec_heatmap(result.eigvec, patch_size, (H, W)))
    _label(heat, "eigenvector")

    img = image.astype(np.float32).copy()
    bip = _upsample(np.asarray(result.bipartition, dtype=np.float32), patch_size, H, W) > 0
    img[bip] = 0.45 * img[bip] + 0.55 * EXPANSION
    seed_cell = _upsample(_patch_grid_mask([result.seed], result.bipartition.shape).astype(np.float32),
                          patch_size, H, W) > 0
    img[seed_cell] = SEED
    part = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw_box_and_gt(ImageDraw.Draw(part), result.box, gt_boxes, lw)
    _label(part, "bipartition")

    sheet = Image.new("RGB", (3 * W + 2 * GAP, H), (24, 24, 24))
    for k, panel in enumerate((left, heat, part)):
        sheet.paste(panel, (k * (W + GAP), 0))
    return sheet
