"""The one way every picture draws a box (mining overlays, cut panels, detections, the report's pictures).

Boxes come from models and files, so they can be anything four numbers can be: sub-pixel (a detection
0.3 px wide), zero-size, inverted (x2 < x1), partly or wholly outside the image, NaN or infinite; and the
images can be as small as 1 x 1. PIL's ``rectangle`` refuses some of these (``x1 must be greater than or
equal to x0`` once the exclusive x2 becomes x2 - 1 on a sub-pixel box) and draws outside a rectangle whose
line is wider than it. So no picture calls ``rectangle`` on a box itself: :func:`pixel_rect` turns any box
into the pixels it covers, and :func:`draw_box` / :func:`draw_boxes` draw that, skipping (and counting) only
what has no pixels to draw.

Boxes are xyxy in pixels with x2/y2 exclusive, as everywhere in the pipeline: ``[20, 10, 40, 30]`` covers
the pixel columns 20..39 and rows 10..29.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.viz.style import LEGEND_SIZE, font_for

__all__ = ["as_boxes", "pixel_rect", "draw_box", "draw_boxes"]


def as_boxes(boxes) -> np.ndarray:
    """``boxes`` (None, one box, a list of boxes, an array or tensor) as an (N, 4) float64 array; None and
    missing values (JSON ``null``) become no box and NaN."""
    return np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def pixel_rect(box, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The inclusive pixel rectangle ``(x0, y0, x1, y1)`` that the xyxy ``box`` covers in an image of
    ``size`` = (width, height): corners sorted, every pixel the box touches (so at least one pixel each way
    for a sub-pixel or zero-size box), clipped to the image. None when a coordinate is NaN/inf or the box
    is wholly outside the image (nothing of it to show)."""
    b = np.asarray(box, dtype=np.float64).reshape(4)
    if not np.isfinite(b).all():
        return None
    rect = []
    for lo, hi, n in ((min(b[0], b[2]), max(b[0], b[2]), size[0]), (min(b[1], b[3]), max(b[1], b[3]), size[1])):
        first = math.floor(lo)
        last = max(math.ceil(hi) - 1, first)  # x2 exclusive; a zero-width box still covers its pixel
        if last < 0 or first > n - 1:
            return None
        rect.append((max(first, 0), min(last, n - 1)))
    (x0, x1), (y0, y1) = rect
    return x0, y0, x1, y1


def draw_box(image: Image.Image, box, colour, width: int = 2, label: str = "",
             label_colour=None) -> tuple[int, int, int, int] | None:
    """Outline ``box`` on ``image`` (in place) with a ``width``-pixel line (at most the image's smaller side;
    a rectangle too small for two lines is filled, which is what its outline would cover), and write
    ``label`` (e.g. a score) inside its top left corner. Returns the pixel rectangle drawn, or None when
    the box was skipped (see :func:`pixel_rect`)."""
    rect = pixel_rect(box, image.size)
    if rect is None:
        return None
    x0, y0, x1, y1 = rect
    w = max(1, min(int(width), image.width, image.height))
    d = ImageDraw.Draw(image)
    if x1 - x0 + 1 <= 2 * w or y1 - y0 + 1 <= 2 * w:
        d.rectangle(rect, fill=colour)
    else:
        d.rectangle(rect, outline=colour, width=w)
    if label:
        d.text((x0 + 3, y0 + 2), label, fill=colour if label_colour is None else label_colour,
               font=font_for(label, LEGEND_SIZE))
    return rect


def draw_boxes(image: Image.Image, boxes, colour, width: int = 2, labels: Sequence[str] | None = None,
               label_colour=None) -> int:
    """Draw each box of ``boxes`` (N x 4, or None for none) with :func:`draw_box` (``labels``: one per box);
    returns how many were skipped (NaN/inf or wholly outside the image)."""
    skipped = 0
    for i, b in enumerate(as_boxes(boxes)):
        label = labels[i] if labels is not None else ""
        skipped += draw_box(image, b, colour, width, label, label_colour) is None
    return skipped
