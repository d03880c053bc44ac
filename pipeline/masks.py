"""Object masks: patch masks -> pixels, COCO run-length encoding (RLE), and the checks of a given segmentation.

Masks live as compressed RLE (``{"size": [h, w], "counts": str}``, pycocotools' format with ``counts`` as
text so it goes into JSON) everywhere but inside one image's work: a dataset's masks are never dense arrays.

How a miner's patch mask becomes pixels (:func:`patch_mask_to_pixels`): every patch is its ``p x p`` block
(nearest neighbour), clipped to the unpadded image the miner saw; when the miner saw a resized image (MaskCut's
square network input, ``max_side``), that mask is resized to the original image by nearest neighbour. So a
mask's bounding box is the miner's box (exactly, without a resize).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def patch_mask_to_pixels(mask: np.ndarray, patch_size: int, seen_size: Sequence[int],
                         original_size: Sequence[int] | None = None) -> np.ndarray:
    """(H0, W0) bool pixel mask of an (h, w) bool patch mask: patch blocks on the (H, W) ``seen_size`` image
    (cells past the grid are False, blocks past the image clipped), resized to ``original_size`` (H0, W0) by
    nearest neighbour (pixel centres) when it differs (:func:`resize_mask`)."""
    mask = np.asarray(mask, dtype=bool)
    p, (H, W) = int(patch_size), (int(seen_size[0]), int(seen_size[1]))
    blocks = np.repeat(np.repeat(mask, p, axis=0), p, axis=1)[:H, :W]
    pixels = np.zeros((H, W), dtype=bool)
    pixels[:blocks.shape[0], :blocks.shape[1]] = blocks
    return pixels if original_size is None else resize_mask(pixels, original_size)


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An (H, W) bool mask at ``size`` (H0, W0) by nearest neighbour at pixel centres (itself when equal)."""
    H, W = mask.shape
    H0, W0 = int(size[0]), int(size[1])
    if (H0, W0) == (H, W):
        return mask
    rows = np.minimum(((np.arange(H0) + 0.5) * H / H0).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(W0) + 0.5) * W / W0).astype(np.int64), W - 1)
    return mask[rows][:, cols]


# ------------------------------------------------------------------------------------------ CRF refinement
CRF_PACKAGE = "pydensecrf2"
CRF_MIN_IOU = 0.5  # CutLER's rule: a mask whose IoU with its refined self is below this is dropped


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def crf_refine(image: np.ndarray, mask: np.ndarray, *, iterations: int = 10, fg_prob: float = 0.9,
               pos_xy: float = 3.0, pos_w: float = 3.0, bi_xy: float = 50.0, bi_rgb: float = 5.0,
               bi_w: float = 10.0) -> np.ndarray:
    """A fully connected CRF (Krähenbühl & Koltun 2011, :data:`CRF_PACKAGE`) on ``image`` ((H, W, 3) uint8 RGB)
    started from ``mask`` ((H, W) bool; a pixel is object with probability ``fg_prob`` inside it, ``1 - fg_prob``
    outside): a smoothness kernel (``pos_xy`` px, weight ``pos_w``) and an appearance kernel (``bi_xy`` px,
    ``bi_rgb`` colour levels, weight ``bi_w``), ``iterations`` of mean-field inference; the refined (H, W) bool
    mask. The values are common dense-CRF settings, not read from CutLER's (non-commercial) code."""
    import pydensecrf.densecrf as dcrf

    H, W = mask.shape
    p = np.where(np.asarray(mask, dtype=bool), fg_prob, 1.0 - fg_prob).astype(np.float32)
    probs = np.stack([1.0 - p, p]).reshape(2, -1)
    crf = dcrf.DenseCRF2D(W, H, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=bi_w)
    q = np.asarray(crf.inference(int(iterations))).reshape(2, H, W)
    return q[1] > q[0]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def refine_or_drop(image: np.ndarray, mask: np.ndarray, refine=None) -> np.ndarray | None:
    """``refine(image, mask)`` (default :func:`crf_refine`), or None (drop the object) when its IoU with ``mask`` is
    below :data:`CRF_MIN_IOU`."""
    refined = (refine or crf_refine)(image, mask)
    return refined if mask_iou(refined, mask) >= CRF_MIN_IOU else None


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of an (H, W) bool mask, ``counts`` as text (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _as_pycoco(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle(rle: dict) -> np.ndarray:
    """The (H, W) bool mask of a compressed RLE (``counts`` text or bytes)."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_as_pycoco(rle)).astype(bool)


def rle_area(rle: dict) -> int:
    """Pixel count of a compressed RLE."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(_as_pycoco(rle)))


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO ``segmentation`` of an image of ``height`` x ``width`` (None: usable). Accepts
    polygons (a list of ``[x1, y1, x2, y2, ...]`` with at least three points each), uncompressed RLE (``counts``
    a list) and compressed RLE (``counts`` text) of the image's size."""
    if isinstance(seg, list):
        if not seg:
            return "an empty polygon list"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2 or len(poly) < 6 or \
                    not all(isinstance(v, (int, float)) for v in poly):
                return f"a polygon with fewer than three points or not x, y numbers ({str(poly)[:60]})"
        return None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return "neither polygons nor RLE (a dict with 'size' and 'counts')"
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or [int(v) for v in size] != [int(height), int(width)]:
        return f"RLE of size {size}, but the image is {height} x {width} (height x width)"
    counts = seg["counts"]
    if isinstance(counts, list):
        ok = all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) == height * width
        return None if ok else f"uncompressed RLE counts that do not sum to {height} x {width} pixels"
    if not isinstance(counts, str):
        return "RLE counts that are neither text nor a list"
    runs = _string_runs(counts)
    if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
        return f"broken RLE counts (they do not decode to runs of {height} x {width} pixels)"
    return None


def _string_runs(counts: str) -> list[int] | None:
    """The runs of COCO's compressed RLE text (pycocotools' ``rleFrString``: 5 bits a character offset by 48,
    a continuation bit, a sign bit, runs from the third on stored as the difference to the run two back);
    None when the text ends inside a number."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                return None
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def to_rle(seg: Any, height: int, width: int) -> dict:
    """A usable COCO segmentation (see :func:`segmentation_problem`) as compressed RLE, ``counts`` text."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, int(height), int(width)))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, int(height), int(width))
    else:
        return {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
