"""Object masks drawn translucent over a picture, one colour per object, with an outline: the one mask painter
of the mining, cut and detection pictures. Survives empty masks, masks of another size (counted, not drawn)
and non-boolean input."""
from __future__ import annotations

from typing import Sequence

import numpy as np

PALETTE = ((255, 99, 71), (30, 144, 255), (50, 205, 50), (255, 215, 0), (186, 85, 211), (0, 206, 209),
           (255, 140, 0), (255, 105, 180))
MASK_ALPHA = 0.45


def edge(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (an outline drawn inside it)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def tint_masks(img: np.ndarray, masks: Sequence[np.ndarray], *, colours: Sequence = PALETTE,
               alpha: float = MASK_ALPHA, outline: int = 2) -> int:
    """Paint each (H, W) mask of ``masks`` over ``img`` ((H, W, 3) float, in place): its pixels blended with
    ``colours[i % len]`` at ``alpha``, its border in that colour. Returns how many masks could not be drawn
    (another size than the picture)."""
    skipped = 0
    for i, m in enumerate(masks):
        m = np.asarray(m).astype(bool)
        if m.shape != img.shape[:2]:
            skipped += 1
            continue
        if not m.any():
            continue
        colour = np.asarray(colours[i % len(colours)], dtype=np.float32)
        img[m] = (1 - alpha) * img[m] + alpha * colour
        img[edge(m, outline)] = colour
    return skipped
