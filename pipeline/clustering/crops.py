"""Cropping a box out of an image and resizing it for the ViT, as LOST's ``cluster_for_OD.py`` does.

Geometry (the reference's choices, kept):
- pixel bounds are the box coordinates rounded half-to-even (Python's ``round``, as the reference),
  rows ``round(y1):round(y2)``, columns ``round(x1):round(x2)`` (x2/y2 exclusive), then clipped to
  the image and widened to at least 1 px;
- the crop is resized so that its shorter side is ``short_side`` (256) and the longer side is
  ``int(short_side * long / short)`` (torchvision ``Resize(256)``'s rule, truncation), bicubic.
  The reference resizes the normalised float tensor with torchvision; we resize the uint8 crop with
  PIL's bicubic filter (antialiased) and normalise afterwards: pixel values differ slightly;
- no padding: the reference feeds each crop alone and DINO's patch embedding silently drops the
  bottom/right remainder that is not a whole patch. We make that explicit (:func:`trim_to_patch`),
  which gives identical tensors and lets crops of the same trimmed shape share a batch.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Iterator

import numpy as np
from PIL import Image


def box_pixel_bounds(box, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer ``(x1, y1, x2, y2)`` (x2/y2 exclusive) of a float xyxy box, clipped, >= 1 px wide/high."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise ValueError(f"box must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (int(round(float(v))) for v in b)  # half-to-even, as the reference's round()
    x1 = min(max(x1, 0), width - 1)
    y1 = min(max(y1, 0), height - 1)
    x2 = min(max(x2, x1 + 1), width)
    y2 = min(max(y2, y1 + 1), height)
    return x1, y1, x2, y2


def crop_box(img: np.ndarray, box) -> np.ndarray:
    """Crop ``box`` (xyxy float pixels) out of ``img`` (H, W, 3) uint8; see :func:`box_pixel_bounds`."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    x1, y1, x2, y2 = box_pixel_bounds(box, img.shape[1], img.shape[0])
    return img[y1:y2, x1:x2]


def resized_shape(height: int, width: int, short_side: int = 256, max_size: int | None = None) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``short_side`` (torchvision ``Resize(int)`` rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_short = max(new_short, 1)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shorter(crop: np.ndarray, short_side: int = 256, max_size: int | None = None) -> np.ndarray:
    """Resize a (h, w, 3) uint8 crop so its shorter side is ``short_side``, bicubic (PIL).

    ``max_size`` caps the longer side (torchvision's ``max_size``); the reference has no cap.
    """
    h, w = crop.shape[:2]
    new_h, new_w = resized_shape(h, w, short_side, max_size)
    if (new_h, new_w) == (h, w):
        return np.ascontiguousarray(crop)
    out = Image.fromarray(np.ascontiguousarray(crop)).resize((new_w, new_h), Image.BICUBIC)
    return np.array(out)  # writable (torch.from_numpy warns on read-only arrays)


def trim_to_patch(img: np.ndarray, patch_size: int) -> np.ndarray:
    """Drop the bottom rows / right columns of an (H, W, ...) image that do not fill a whole patch."""
    h, w = img.shape[:2]
    hp, wp = (h // patch_size) * patch_size, (w // patch_size) * patch_size
    if hp == 0 or wp == 0:
        raise ValueError(f"crop of {h}x{w} px is smaller than one {patch_size}x{patch_size} patch")
    return img[:hp, :wp]


def batches_by_shape(
    items: Iterable[tuple[int, np.ndarray]], batch_size: int, max_pending: int | None = None
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Group ``(key, array)`` items into batches of arrays of identical shape.

    A batch is yielded when its shape bucket holds ``batch_size`` items; when more than
    ``max_pending`` (default ``8 * batch_size``) items wait in all buckets, the fullest bucket is
    flushed early, bounding memory; everything left is flushed at the end. Order inside a batch
    follows input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pending = max_pending or 8 * batch_size
    buckets: dict[tuple, list[tuple[int, np.ndarray]]] = defaultdict(list)
    pending = 0
    for key, arr in items:
        bucket = buckets[arr.shape]
        bucket.append((key, arr))
        pending += 1
        if len(bucket) >= batch_size:
            pending -= len(bucket)
            yield [k for k, _ in bucket], [a for _, a in bucket]
            del buckets[arr.shape]
        elif pending > max_pending:
            shape = max(buckets, key=lambda s: len(buckets[s]))
            full = buckets.pop(shape)
            pending -= len(full)
            yield [k for k, _ in full], [a for _, a in full]
    for shape in list(buckets):
        full = buckets.pop(shape)
        yield [k for k, _ in full], [a for _, a in full]
