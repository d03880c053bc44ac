"""Pictures of what a miner did: seed, expanded patches, the component, the box, the GT.

Colours, the title font and ``save_png`` live in :mod:`pipeline.viz.style` (re-exported here).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.viz.style import COMPONENT, GT, PRED, SEED, draw_title, save_png
from pipeline.viz.style import EXPANSION as _EXPANSION

EXPANSION = np.array(_EXPANSION, dtype=np.float32)
OUTSIDE_DIM = 0.45    # pixels outside the mined component keep 45% of their brightness
EXPANSION_ALPHA = 0.55

__all__ = ["GT", "PRED", "SEED", "EXPANSION", "COMPONENT", "draw_mining", "save_png", "contact_sheet"]


def _patch_grid_mask(indices, dims: tuple[int, int]) -> np.ndarray:
    m = np.zeros(dims[0] * dims[1], dtype=bool)
    if indices is not None and len(indices):
        m[np.asarray(indices, dtype=np.int64)] = True
    return m.reshape(dims)


def _upsample(mask: np.ndarray, patch_size: int, h: int, w: int) -> np.ndarray:
    up = np.kron(np.asarray(mask, dtype=np.uint8), np.ones((patch_size, patch_size), np.uint8)).astype(bool)
    out = np.zeros((h, w), bool)
    out[:min(h, up.shape[0]), :min(w, up.shape[1])] = up[:h, :w]
    return out


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (the outline drawn inside it)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def draw_box_and_gt(d: ImageDraw.ImageDraw, box, gt_boxes, lw: int) -> None:
    """The GT boxes (green) and the predicted box (red, thicker) on a drawing; x2/y2 exclusive."""
    for b in (np.zeros((0, 4)) if gt_boxes is None else np.asarray(gt_boxes).reshape(-1, 4)):
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=GT, width=lw)
    box = np.asarray(box).reshape(4)
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=PRED, width=lw + 1)


def draw_mining(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Overlay on ``image`` (H, W, 3 uint8): the component mask (everything outside it dimmed to
    ``OUTSIDE_DIM``, the component outlined in white), the expansion patches (``similars``, blue),
    the seed patch (yellow square), the predicted box (red) and GT boxes (green); ``title`` on a
    black band (a font with the glyphs of the text, see :mod:`pipeline.viz.style`)."""
    img = image.astype(np.float32).copy()
    h, w = img.shape[:2]
    lw = max(2, round(min(h, w) / 150))
    mask = getattr(result, "mask", None)
    outline = None
    if mask is not None:
        dims = mask.shape
        comp = _upsample(mask, patch_size, h, w)
        if comp.any():
            img[~comp] *= OUTSIDE_DIM
            outline = _edge(comp, lw)
        similars = getattr(result, "similars", None)
        if similars is not None:
            sim = _upsample(_patch_grid_mask(similars, dims), patch_size, h, w)
            img[sim] = (1 - EXPANSION_ALPHA) * img[sim] + EXPANSION_ALPHA * EXPANSION
        if outline is not None:
            img[outline] = COMPONENT
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    draw_box_and_gt(d, result.box, gt_boxes, lw)
    seed = getattr(result, "seed", None)
    if seed is not None and mask is not None:
        r, c = divmod(int(seed), mask.shape[1])
        d.rectangle([c * patch_size, r * patch_size, (c + 1) * patch_size - 1, (r + 1) * patch_size - 1],
                    outline=SEED, width=lw)
    return draw_title(pil, title)


def contact_sheet(paths: list[str | os.PathLike], out_path: str | os.PathLike, cols: int = 4,
                  thumb: int = 256) -> Path | None:
    """Tile the PNGs at ``paths`` (aspect kept, fitted in ``thumb`` squares) into one PNG."""
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        return None
    cols = max(1, min(cols, len(paths)))
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (24, 24, 24))
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb - 4, thumb - 4))
            x = (k % cols) * thumb + (thumb - im.width) // 2
            y = (k // cols) * thumb + (thumb - im.height) // 2
            sheet.paste(im, (x, y))
    return save_png(sheet, out_path)
