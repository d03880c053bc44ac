"""Pictures of what a miner did: seed, expanded patches, the component, the box, the GT.

Colours, the title font and ``save_png`` live in :mod:`pipeline.viz.style` (re-exported here).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.viz.boxes import as_boxes, draw_box, draw_boxes
from pipeline.viz.masks import edge
from pipeline.viz.style import COMPONENT, GT, PRED, SEED, Key, finish_picture, save_png
from pipeline.viz.style import EXPANSION as _EXPANSION

EXPANSION = np.array(_EXPANSION, dtype=np.float32)
OUTSIDE_DIM = 0.45    # pixels outside the mined component keep 45% of their brightness
EXPANSION_ALPHA = 0.55

__all__ = ["GT", "PRED", "SEED", "EXPANSION", "COMPONENT", "draw_mining", "mining_overlay", "save_png",
           "contact_sheet"]


def _patch_grid_mask(indices, dims: tuple[int, int]) -> np.ndarray:
    m = np.zeros(dims[0] * dims[1], dtype=bool)
    if indices is not None and len(indices):
        m[np.asarray(indices, dtype=np.int64)] = True
    return m.reshape(dims)


def upsample_grid(grid: np.ndarray, patch_size: int, h: int, w: int) -> np.ndarray:
    """An (gh, gw) patch grid (a mask, an eigenvector) as an (h, w) pixel map: each cell repeated
    ``patch_size`` times, cropped or zero-padded to (h, w). The grid covers the image padded to a multiple
    of the patch, so it is cropped; zero padding keeps an image smaller than one patch (1 x 1, 5 x 3 with
    patch 16) and a grid smaller than the image from failing."""
    g = np.asarray(grid)
    up = np.repeat(np.repeat(g, patch_size, axis=0), patch_size, axis=1)
    out = np.zeros((h, w), dtype=g.dtype)
    out[:min(h, up.shape[0]), :min(w, up.shape[1])] = up[:h, :w]
    return out


def zoom_image(image: np.ndarray, k: int) -> np.ndarray:
    """``image`` enlarged ``k`` times with nearest-neighbour (each pixel a k x k block: patches stay sharp)."""
    return np.repeat(np.repeat(np.asarray(image), k, axis=0), k, axis=1) if k > 1 else np.asarray(image)


def line_width(h: int, w: int) -> int:
    """Box line width for an h x w picture: 2 px, thicker on large pictures (capped by the box drawer)."""
    return max(2, round(min(h, w) / 150))


def scale_boxes(boxes, k: float):
    """``boxes`` (N x 4 xyxy, or None) in the pixels of a picture zoomed ``k`` times."""
    return None if boxes is None else as_boxes(boxes) * k


def draw_box_and_gt(image: Image.Image, box, gt_boxes, lw: int) -> int:
    """The GT boxes (green) and the predicted box (red, thicker) on ``image`` (in place); returns how many
    could not be drawn (see :func:`pipeline.viz.boxes.draw_boxes`)."""
    return draw_boxes(image, gt_boxes, GT, lw) + draw_boxes(image, box, PRED, lw + 1)


def mining_overlay(image: np.ndarray, result, patch_size: int, gt_boxes=None, zoom: int = 1
                   ) -> tuple[Image.Image, int]:
    """The overlay of :func:`draw_mining` without title and legend, ``zoom`` times the image's size
    (nearest-neighbour; boxes scaled with it); returns it and the number of boxes not drawn."""
    img = zoom_image(image, zoom).astype(np.float32)
    patch = patch_size * zoom
    h, w = img.shape[:2]
    lw = line_width(h, w)
    mask = getattr(result, "mask", None)
    outline = None
    if mask is not None:
        dims = mask.shape
        comp = upsample_grid(np.asarray(mask, dtype=bool), patch, h, w)
        if comp.any():
            img[~comp] *= OUTSIDE_DIM
            outline = edge(comp, lw)
        similars = getattr(result, "similars", None)
        if similars is not None:
            sim = upsample_grid(_patch_grid_mask(similars, dims), patch, h, w)
            img[sim] = (1 - EXPANSION_ALPHA) * img[sim] + EXPANSION_ALPHA * EXPANSION
        if outline is not None:
            img[outline] = COMPONENT
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    skipped = draw_box_and_gt(pil, scale_boxes(result.box, zoom), scale_boxes(gt_boxes, zoom), lw)
    seed = getattr(result, "seed", None)
    if seed is not None and mask is not None:
        r, c = divmod(int(seed), mask.shape[1])
        draw_box(pil, [c * patch, r * patch, (c + 1) * patch, (r + 1) * patch], SEED, lw)
    return pil, skipped


def mining_keys(result, gt_boxes=None) -> list[Key]:
    """The legend of a mining picture: only what it shows (seed, expansion, component, box, GT)."""
    has_mask = getattr(result, "mask", None) is not None
    keys = [Key(SEED, "seed", 2)] if has_mask and getattr(result, "seed", None) is not None else []
    if has_mask and getattr(result, "similars", None) is not None:
        keys.append(Key(_EXPANSION, "expansion"))
    if has_mask:
        keys.append(Key(COMPONENT, "component", 1))
    keys.append(Key(PRED, "box", 2))
    if len(as_boxes(gt_boxes)):
        keys.append(Key(GT, "GT", 2))
    return keys


def draw_mining(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Overlay on ``image`` (H, W, 3 uint8): the component mask (everything outside it dimmed to
    ``OUTSIDE_DIM``, the component outlined in white), the expansion patches (``similars``, blue),
    the seed patch (yellow square), the predicted box (red) and GT boxes (green); ``title`` on a
    black band and a legend line below (:func:`pipeline.viz.style.finish_picture`). Any image size
    (down to 1 x 1, smaller than a patch) and any box (:mod:`pipeline.viz.boxes`) can be drawn."""
    pil, skipped = mining_overlay(image, result, patch_size, gt_boxes)
    return finish_picture(pil, title, mining_keys(result, gt_boxes), skipped)


def contact_sheet(paths: list[str | os.PathLike], out_path: str | os.PathLike, cols: int = 4,
                  thumb: int = 256) -> Path | None:
    """Tile the PNGs at ``paths`` (aspect kept, fitted in ``thumb`` squares) into one PNG; pictures of any
    size (a 1 x 1 one stays 1 x 1, centred)."""
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        return None
    cols = max(1, min(cols, len(paths)))
    thumb = max(5, int(thumb))
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
