"""Torch Dataset for mining: decode, (optionally) resize, normalise and pad one image per item; errors
are returned."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import try_decode
from pipeline.data.records import ImageRecord


def resize_max_side(img: np.ndarray, max_side: int | None) -> np.ndarray:
    """``img`` (H, W, 3 uint8) shrunk (bicubic, aspect kept) so that its longer side is ``<= max_side``;
    unchanged when it already fits or ``max_side`` is None. New sides: ``round(side * max_side / max(H, W))``
    (at least 1)."""
    if max_side is None:
        return img
    h, w = img.shape[:2]
    if max(h, w) <= int(max_side):
        return img
    s = int(max_side) / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return np.array(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), dtype=np.uint8)  # writable copy


def resize_square(img: np.ndarray, side: int | None) -> np.ndarray:
    """``img`` resized (bicubic) to ``side`` x ``side`` (aspect not kept, as MaskCut feeds its ViT); unchanged
    when ``side`` is None."""
    if side is None or img.shape[:2] == (int(side), int(side)):
        return img
    return np.array(Image.fromarray(img).resize((int(side), int(side)), Image.BICUBIC), dtype=np.uint8)


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``img`` resized (bicubic) to ``size`` (H, W), e.g. to draw on what a miner saw."""
    if img.shape[:2] == tuple(size):
        return img
    return np.array(Image.fromarray(img).resize((int(size[1]), int(size[0])), Image.BICUBIC), dtype=np.uint8)


def box_to_original(box, size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """A box ``[x1, y1, x2, y2]`` in the pixels of the resized ``size`` (H, W) mapped to the original
    image (``original_size`` (H, W)): x scaled by W0 / W, y by H0 / H (exact per-axis factors, not the
    rounded ``scale``), clipped to the original image."""
    (h, w), (h0, w0) = size, original_size
    b = np.asarray(box, dtype=np.float64).reshape(4) * np.array([w0 / w, h0 / h, w0 / w, h0 / h])
    return np.clip(b, 0, [w0, h0, w0, h0])


class MiningImages(torch.utils.data.Dataset):
    """Items ``{"index", "record", "image", "size", "error", "scale", "original_size"}`` for
    ``records[indices[i]]``.

    ``index`` is the position in ``records``; ``image`` is ``preprocess_image``'s (3, Hp, Wp) tensor
    (ImageNet-normalised, zero-padded to a multiple of ``patch_size``) and ``size`` the unpadded
    (H, W). A file that cannot be used (ImageLoadError, e.g. corrupt, or smaller than one patch)
    gives ``image=None, size=None`` and the message in ``error``, so one bad image never kills a
    DataLoader worker.

    ``max_side`` (None: off, the reference's behaviour): images whose longer side exceeds it are
    resized (bicubic, aspect kept, :func:`resize_max_side`) before normalising and padding. Then
    ``size`` is the resized (H, W), ``original_size`` the decoded one and ``scale`` the factor applied
    (``size ~= original_size * scale``; 1.0 when not resized). Boxes found on the resized image map
    back to original pixels with :func:`box_to_original` ``(box, size, original_size)``. ``square``
    (None: off) resizes every image to that square after ``max_side`` (a miner's fixed input size, e.g.
    MaskCut's 480); ``scale`` is then the vertical factor.
    """

    def __init__(self, records: list[ImageRecord], patch_size: int, indices: list[int] | None = None,
                 max_side: int | None = None, square: int | None = None):
        from pipeline.data.preprocess import preprocess_image

        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if max_side is not None and int(max_side) < int(patch_size):
            raise ValueError(f"max_side={max_side} is smaller than one patch ({patch_size} px): use null (off) "
                             "or a larger value, e.g. 1000")
        if square is not None and int(square) < int(patch_size):
            raise ValueError(f"square={square} is smaller than one patch ({patch_size} px)")
        self.max_side = None if max_side is None else int(max_side)
        self.square = None if square is None else int(square)
        self.records = list(records)
        self.patch_size = int(patch_size)
        self.indices = list(range(len(self.records))) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(self.records)]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for {len(self.records)} records")
        self._preprocess = preprocess_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        rec = self.records[index]
        item = {"index": index, "record": rec, "image": None, "size": None, "error": None, "scale": None,
                "original_size": None}
        img, err = try_decode(rec.path, min_size=self.patch_size)
        if err is not None:
            item["error"] = err
            return item
        h0, w0 = img.shape[:2]
        img = resize_square(resize_max_side(img, self.max_side), self.square)
        if min(img.shape[:2]) < self.patch_size:
            item["error"] = (f"image {rec.path} is {w0}x{h0} pixels (W x H): resized to a longer side of "
                             f"{self.max_side} px its shorter side is below one patch ({self.patch_size} px). "
                             "Raise max_side (the longer side images are shrunk to) or remove the image.")
            return item
        tensor, size = self._preprocess(img, self.patch_size)
        item["image"], item["size"] = tensor, (int(size[0]), int(size[1]))
        item["original_size"] = (int(h0), int(w0))
        item["scale"] = 1.0 if (h0, w0) == item["size"] else item["size"][0] / h0
        return item


def collate_single(batch: list[dict]) -> dict:
    """Collate for ``batch_size=1``: the item itself (no batch dimension added, None kept)."""
    if len(batch) != 1:
        raise ValueError(f"collate_single expects batch_size=1, got a batch of {len(batch)}")
    return batch[0]


def collate_list(batch: list[dict]) -> list[dict]:
    """Collate for ``batch_size=B``: the items as a list (images keep their own sizes; errors kept), for
    ``Backbone.features_batch``, which groups them by size itself."""
    return list(batch)
