"""Pictures of what a miner did: seed, expanded patches, the component, the box, the GT."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.artifacts import atomic_path

PRED = (255, 40, 40)
GT = (40, 220, 60)
SEED = (255, 220, 0)
EXPANSION = np.array([0, 140, 255], dtype=np.float32)


def _patch_grid_mask(indices, dims: tuple[int, int]) -> np.ndarray:
    m = np.zeros(dims[0] * dims[1], dtype=bool)
    if indices is not None and len(indices):
        m[np.asarray(indices, dtype=np.int64)] = True
    return m.reshape(dims)


def draw_mining(image: np.ndarray, result, patch_size: int, gt_boxes=None, title: str = "") -> Image.Image:
    """Overlay on ``image`` (H, W, 3 uint8): the component mask (light tint), the expansion patches
    (``similars``, blue), the seed patch (yellow square), the predicted box (red) and GT boxes (green)."""
    img = image.astype(np.float32).copy()
    h, w = img.shape[:2]
    mask = getattr(result, "mask", None)
    if mask is not None:
        dims = mask.shape
        up = np.kron(mask.astype(np.float32), np.ones((patch_size, patch_size), np.float32))[:h, :w]
        img[up > 0] = 0.75 * img[up > 0] + 0.25 * 255
        similars = getattr(result, "similars", None)
        if similars is not None:
            sim = np.kron(_patch_grid_mask(similars, dims).astype(np.float32),
                          np.ones((patch_size, patch_size), np.float32))[:h, :w]
            img[sim > 0] = 0.45 * img[sim > 0] + 0.55 * EXPANSION
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    lw = max(2, round(min(h, w) / 150))
    for b in (np.zeros((0, 4)) if gt_boxes is None else np.asarray(gt_boxes).reshape(-1, 4)):
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=GT, width=lw)
    box = np.asarray(result.box).reshape(4)
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=PRED, width=lw + 1)
    seed = getattr(result, "seed", None)
    if seed is not None and mask is not None:
        r, c = divmod(int(seed), mask.shape[1])
        d.rectangle([c * patch_size, r * patch_size, (c + 1) * patch_size - 1, (r + 1) * patch_size - 1],
                    outline=SEED, width=lw)
    if title:
        d.rectangle([0, 0, 8 + 7 * len(title), 16], fill=(0, 0, 0))
        d.text((4, 3), title, fill=(255, 255, 255))
    return pil


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


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
