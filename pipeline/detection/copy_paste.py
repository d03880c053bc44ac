"""Copy-paste augmentation of detector training samples (Ghiasi et al., "Simple Copy-Paste is a Strong Data
Augmentation Method for Instance Segmentation", CVPR 2021; used by CutLER, Wang et al., CVPR 2023).

A random subset of the objects of a second training image (the *source*) is cut out with its masks, scaled
by a random factor and pasted onto the image (the *destination*), with no blending (Ghiasi et al. found a
Gaussian-smoothed alpha no better than the plain binary one). The selected objects move together as one block:
the bounding box of the union of their masks, scaled as a whole, so they keep their layout (Ghiasi et al.
paste a rescaled source image). The block is clipped at the destination's border (images may differ in size).
The annotations are then updated: every destination mask loses the pasted pixels (``mask &= ~pasted``), every
box is the extent of its mask (pasted objects included), an object whose mask becomes empty disappears with its
label and box, and the pasted objects' masks, boxes and labels are appended.

Two layers, so that augmentation stays a pure function of the sampler's seed (exact resume, worker-independent,
as :mod:`pipeline.detection.data`):

- :func:`copy_paste` does one paste, deterministically, from its parameters (scale, offset, which objects);
- :func:`draw_paste` draws those parameters from a ``numpy.random.Generator``; :class:`CopyPasteDataset`
  wraps a dataset whose ``__getitem__`` takes ``(index, flip)`` keys (:class:`~pipeline.detection.data.
  DetectionDataset`) and seeds that generator from ``(seed, key)``.

Samples are those of :mod:`pipeline.detection.data`: ``(image float CHW in 0..1, {"boxes": (n, 4) float32 xyxy
(x2/y2 exclusive), "labels": (n,) int64, "image_id": int, "masks": (n, H, W) uint8})``; masks are required.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.masks import resize_mask

# The scale of the pasted block, uniform in this range. CutLER's paper (Sec. 3.3 / implementation details)
# replaces the vanilla copy-paste by one that downsamples the pasted mask by a factor drawn uniformly in
# [0.3, 1.0], so that the detector sees small objects: pseudo-masks of self-supervised miners (MaskCut, LOST,
# TokenCut) are mostly large, salient objects. Ghiasi et al.'s large scale jittering (each image resized by
# 0.1..2.0) changes the scale of the whole image, and with it the source's relative to the destination's; we
# do not jitter the destination (the detector's own resize and flip stay as they are), so one factor on the
# pasted block is the whole of it, and CutLER's range is the default. (0.1, 2.0) is a valid setting too.
DEFAULT_SCALE_RANGE = (0.3, 1.0)
_SEED_TAG = 0xC0B1  # keeps the wrapper's streams apart from the sampler's epoch_order(seed, epoch)


@dataclass(frozen=True)
class PasteParams:
    """One paste: the block's ``scale``, where its top-left corner lands (``offset`` = (x, y) in destination
    pixels, may be negative: clipped) and which source objects (``select``, indices into the source target)."""
    scale: float
    offset: tuple[int, int] | None
    select: tuple[int, ...]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, 4) float32 xyxy extent of each (n, H, W) mask, x2/y2 exclusive (a mask of one pixel (r, c) is
    [c, r, c + 1, r + 1]); an empty mask gives zeros."""
    m = masks.bool()
    n, H, W = m.shape
    rows, cols = m.any(2), m.any(1)
    y0 = rows.int().argmax(1)
    y1 = H - rows.flip(1).int().argmax(1)
    x0 = cols.int().argmax(1)
    x1 = W - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).to(torch.float32)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def block_extent(masks: torch.Tensor, select: Sequence[int]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) extent of the union of the ``select``-ed masks (exclusive ends); None when empty."""
    if len(select) == 0:
        return None
    union = masks[list(select)].bool().any(0, keepdim=True)
    if not union.any():
        return None
    return tuple(int(v) for v in mask_boxes(union)[0].tolist())


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of a ``height`` x ``width`` block scaled by ``scale``: rounded half up, at least one pixel."""
    return max(1, int(math.floor(height * scale + 0.5))), max(1, int(math.floor(width * scale + 0.5)))


def _check_sample(image: torch.Tensor, target: dict, what: str) -> None:
    if image.dim() != 3:
        raise ValueError(f"copy-paste: the {what} image must be CHW, got shape {tuple(image.shape)}")
    masks = target.get("masks")
    if masks is None:
        raise ValueError(f"copy-paste: the {what} target has no 'masks' (copy-paste cuts objects by their masks)")
    n = len(target["labels"])
    if masks.dim() != 3 or tuple(masks.shape) != (n, *image.shape[-2:]) or len(target["boxes"]) != n:
        raise ValueError(f"copy-paste: the {what} target's masks {tuple(masks.shape)}, boxes "
                         f"{tuple(target['boxes'].shape)} and labels ({n}) do not fit its image "
                         f"{tuple(image.shape)}")


def _scaled_block(image: torch.Tensor, masks: torch.Tensor, extent, scale: float):
    """The source block (image crop (C, h, w), masks (k, h, w) bool) at ``extent``, scaled by ``scale``: the
    image bilinearly (antialiased when shrinking), the masks by nearest neighbour at pixel centres."""
    x0, y0, x1, y1 = extent
    crop, mcrop = image[:, y0:y1, x0:x1], masks[:, y0:y1, x0:x1].bool()
    h, w = scaled_size(y1 - y0, x1 - x0, scale)
    if (h, w) == (y1 - y0, x1 - x0):
        return crop, mcrop
    shrink = h < y1 - y0 or w < x1 - x0
    crop = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[0]
    mcrop = torch.from_numpy(np.stack([resize_mask(m.numpy(), (h, w)) for m in mcrop]))
    return crop.clamp(0, 1), mcrop


def _place(block_image, block_masks, offset, size):
    """The block put on an empty canvas of ``size`` (H, W) with its top-left at ``offset`` (x, y), clipped:
    (image (C, H, W), masks (k, H, W) bool)."""
    H, W = size
    (ox, oy), (h, w) = offset, block_masks.shape[-2:]
    image = block_image.new_zeros((block_image.shape[0], H, W))
    masks = torch.zeros((block_masks.shape[0], H, W), dtype=torch.bool)
    ty0, ty1, tx0, tx1 = max(oy, 0), min(oy + h, H), max(ox, 0), min(ox + w, W)
    if ty1 > ty0 and tx1 > tx0:
        sy, sx = ty0 - oy, tx0 - ox
        image[:, ty0:ty1, tx0:tx1] = block_image[:, sy:sy + ty1 - ty0, sx:sx + tx1 - tx0]
        masks[:, ty0:ty1, tx0:tx1] = block_masks[:, sy:sy + ty1 - ty0, sx:sx + tx1 - tx0]
    return image, masks


def copy_paste(image: torch.Tensor, target: dict, source_image: torch.Tensor, source_target: dict, *,
               scale: float = 1.0, offset: tuple[int, int] | None = None,
               select: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
    """``image`` with the ``select``-ed objects of the source (all when None) pasted on it, and its target.

    The selected objects' block (the extent of the union of their masks) is scaled by ``scale`` and its top-left
    corner put at ``offset`` = (x, y) in ``image`` (None: where scaling the whole source image by ``scale`` puts
    it, as Ghiasi et al. paste a rescaled image), clipped at the border; pixels under the pasted masks are the
    source's, the rest unchanged. Every box is recomputed as its mask's extent; an object whose mask the paste
    empties is removed (box, label, mask), as is a pasted one left without pixels (clipped away). An object whose
    mask was empty before keeps its box; ``scores`` (when the destination has them) follow their objects (a
    source without them: 1.0). Other keys (``image_id``) pass through. The
    inputs are not modified. Pure and deterministic."""
    _check_sample(image, target, "destination")
    _check_sample(source_image, source_target, "source")
    if source_image.shape[0] != image.shape[0]:
        raise ValueError(f"copy-paste: the source image has {source_image.shape[0]} channels, the destination "
                         f"{image.shape[0]}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"copy-paste: scale must be a positive number, got {scale}")
    n_src = len(source_target["labels"])
    select = list(range(n_src)) if select is None else [int(i) for i in select]
    if any(not 0 <= i < n_src for i in select):
        raise ValueError(f"copy-paste: select {select} is out of the source's {n_src} objects")
    extent = block_extent(source_target["masks"], select)
    if extent is None:
        return image.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()}
    block_image, block_masks = _scaled_block(source_image.to(image.dtype), source_target["masks"][select],
                                             extent, scale)
    if offset is None:
        offset = (int(math.floor(extent[0] * scale + 0.5)), int(math.floor(extent[1] * scale + 0.5)))
    pasted_image, pasted_masks = _place(block_image, block_masks, (int(offset[0]), int(offset[1])),
                                        image.shape[-2:])
    alpha = pasted_masks.any(0)
    out_image = torch.where(alpha[None], pasted_image, image)
    dest_masks = target["masks"].bool()
    masks = torch.cat([dest_masks & ~alpha, pasted_masks])
    had = torch.cat([dest_masks.flatten(1).any(1), torch.ones(len(select), dtype=torch.bool)])
    has = masks.flatten(1).any(1)
    old = torch.cat([target["boxes"].to(torch.float32), torch.zeros((len(select), 4))])
    boxes = torch.where(has[:, None], mask_boxes(masks), old)
    labels = torch.cat([target["labels"], source_target["labels"][select].to(target["labels"].dtype)])
    keep = has | ~had
    out = dict(target)
    out.update(boxes=boxes[keep], labels=labels[keep], masks=masks[keep].to(torch.uint8))
    if "scores" in target:  # the pseudo-boxes' scores (score_weighting) follow their objects
        ones = torch.ones(n_src, dtype=target["scores"].dtype)
        out["scores"] = torch.cat([target["scores"], source_target.get("scores", ones)[select].to(ones.dtype)])[keep]
    return out_image, out


def _uniform_offset(rng: np.random.Generator, room: int) -> int:
    """A position uniform in [0, room] when the block fits (``room`` >= 0: wholly inside), else in [room, 0]
    (the block covers that axis and is clipped at a random place)."""
    return int(rng.integers(min(0, room), max(0, room) + 1))


def check_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    """``scale_range`` as (low, high) floats, 0 < low <= high, finite; else a ValueError saying so."""
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise ValueError(f"copy-paste scale_range must be two numbers (low, high), got {scale_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"copy-paste scale_range must have 0 < low <= high, got {scale_range!r}")
    return lo, hi


def draw_paste(rng: np.random.Generator, source_masks: torch.Tensor, dest_size: Sequence[int],
               scale_range: Sequence[float] = DEFAULT_SCALE_RANGE) -> PasteParams | None:
    """The parameters of one paste of objects of a source with masks ``source_masks`` (n, h, w) onto an image of
    ``dest_size`` (H, W), drawn from ``rng`` in a fixed order (so a pure function of its state):

    - which objects: a random subset (Ghiasi et al.) of the non-empty masks, its size uniform in 1..n, the
      objects uniform without replacement;
    - ``scale`` uniform in ``scale_range`` (default :data:`DEFAULT_SCALE_RANGE`, CutLER's 0.3..1.0);
    - ``offset``: the scaled block's top-left (x, y) uniform over the places where it lies wholly inside the
      image, or, on an axis where it is larger than the image, where it covers it (then clipped).

    None when the source has no object with pixels (nothing to paste)."""
    lo, hi = check_scale_range(scale_range)
    nonempty = [i for i in range(len(source_masks)) if bool(source_masks[i].any())]
    if not nonempty:
        return None
    k = int(rng.integers(1, len(nonempty) + 1))
    select = tuple(sorted(int(i) for i in rng.choice(nonempty, size=k, replace=False)))
    scale = float(rng.uniform(lo, hi))
    x0, y0, x1, y1 = block_extent(source_masks, select)
    h, w = scaled_size(y1 - y0, x1 - x0, scale)
    ox = _uniform_offset(rng, int(dest_size[1]) - w)
    oy = _uniform_offset(rng, int(dest_size[0]) - h)
    return PasteParams(scale=scale, offset=(ox, oy), select=select)


def _split_key(key) -> tuple[int, bool, tuple[int, ...]]:
    """``i`` | ``(i, flip)`` | ``(i, flip, *extra)`` -> (i, flip, extra); ``extra`` (non-negative ints, e.g. the
    sampler's stream position) only seeds the draw, so a sampler can make each epoch's paste differ."""
    if isinstance(key, tuple):
        i, flip, extra = key[0], bool(key[1]) if len(key) > 1 else False, tuple(int(v) for v in key[2:])
    else:
        i, flip, extra = key, False, ()
    if int(i) < 0 or any(v < 0 for v in extra):
        raise IndexError(f"copy-paste: key {key!r} must hold non-negative integers")
    return int(i), flip, extra


class CopyPasteDataset(torch.utils.data.Dataset):
    """``dataset`` with copy-paste: sample ``key`` is the wrapped ``dataset[(i, flip)]``, onto which, with
    ``probability``, objects of another image of the dataset are pasted (:func:`draw_paste`, :func:`copy_paste`).

    Every choice (whether to paste, the source image (uniform among the others), its horizontal flip (when
    ``flip_source``, as Ghiasi et al. flip both images), the objects, scale and place) comes from a generator
    seeded by ``(seed, i, flip, *extra)``: a pure function of the key, so resumes and workers see the same
    samples. With ``probability`` 0 the wrapped samples come back unchanged. Other attributes (``num_classes``,
    ``stats``, ...) are the wrapped dataset's. The wrapped samples must carry masks."""

    def __init__(self, dataset, probability: float, scale_range: Sequence[float] = DEFAULT_SCALE_RANGE,
                 seed: int = 0, *, flip_source: bool = True) -> None:
        if not (0.0 <= float(probability) <= 1.0):
            raise ValueError(f"copy-paste probability must be in [0, 1], got {probability}")
        if getattr(dataset, "masks", True) is False:
            raise ValueError("copy-paste needs masks: the wrapped dataset has none (a Mask R-CNN preset trains "
                             "with them; a box-only detector cannot use copy-paste)")
        if int(seed) < 0:
            raise ValueError(f"copy-paste seed must be a non-negative integer, got {seed}")
        self.dataset, self.probability = dataset, float(probability)
        self.scale_range, self.seed, self.flip_source = check_scale_range(scale_range), int(seed), bool(flip_source)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "dataset":  # unpickling (DataLoader workers) looks these up first
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        i, flip, extra = _split_key(key)
        image, target = self.dataset[(i, flip)]
        if self.probability <= 0.0:
            return image, target
        rng = np.random.default_rng([_SEED_TAG, self.seed, i, int(flip), *extra])
        if not rng.random() < self.probability:
            return image, target
        n = len(self.dataset)
        j = i if n == 1 else int(rng.integers(n - 1))
        j += int(n > 1 and j >= i)
        source_flip = self.flip_source and bool(rng.random() < 0.5)
        source_image, source_target = self.dataset[(j, source_flip)]
        params = draw_paste(rng, source_target["masks"], image.shape[-2:], self.scale_range)
        if params is None:
            return image, target
        return copy_paste(image, target, source_image, source_target, scale=params.scale, offset=params.offset,
                          select=params.select)
