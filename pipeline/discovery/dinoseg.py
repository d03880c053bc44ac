"""DINO-seg baseline (as in LOST's comparison): box of the largest blob of one head's CLS attention.

Features in, result out; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

from pipeline.discovery.lost import check_grid, grid_mask_box


@dataclass
class DinoSegResult:
    """``box``: (4,) float64 xyxy pixels, x2/y2 exclusive; ``mask``: (h, w) bool, the chosen
    component; ``score``: the share of the head's attention mass inside that component, in [0, 1]
    (0.0 in the degenerate fallback)."""

    box: np.ndarray
    mask: np.ndarray
    score: float


def attention_mass_mask(attn: torch.Tensor, mass: float) -> torch.Tensor:
    """Boolean mask of the patches holding the top ``mass`` fraction of an attention vector (N,).

    As DINO's visualisation: sort ascending, normalise to sum 1, keep entries whose cumulative sum
    is ``> 1 - mass``. The sort is stable (equal values keep patch order). All False when the
    attention sums to zero.
    """
    val, idx = torch.sort(attn, stable=True)
    total = val.sum()
    if not total > 0:
        return torch.zeros_like(attn, dtype=torch.bool)
    keep_sorted = torch.cumsum(val / total, dim=0) > (1 - mass)
    keep = torch.zeros_like(keep_sorted)
    keep[idx] = keep_sorted
    return keep


def dinoseg(cls_attn: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
            head: int = 4, mass: float = 0.6) -> DinoSegResult:
    """DINO-seg on one image.

    ``cls_attn``: (num_heads, N) last-block attention of CLS to the patches (a leading batch of 1 is
    accepted); ``dims = (h, w)``; ``image_size = (H, W)`` of the unpadded image. Keeps the ``mass``
    fraction of head ``head``'s attention (:func:`attention_mass_mask`), labels 4-connected
    components (scipy.ndimage default), takes the largest (ties: lowest label, i.e. first in
    row-major order) and returns its patch extent in pixels, clipped to (W, H).

    Deviation from the reference ``dino_seg``: it sizes components over ``range(max(label))``,
    so the last label is never considered and with a single component it returns the background
    (label 0). Here every label 1..max competes; the reference also does not clip to the image.
    Fallback: with no foreground (all-zero attention), the box is the whole image, the mask all
    True and the score 0.0.
    """
    attn = cls_attn if isinstance(cls_attn, torch.Tensor) else torch.as_tensor(np.asarray(cls_attn))
    if attn.dim() == 3 and attn.shape[0] == 1:
        attn = attn[0]
    if attn.dim() != 2:
        raise ValueError(
            f"dinoseg: cls_attn must be (num_heads, N), the last block's CLS-to-patch attention, "
            f"got shape {tuple(attn.shape)}"
        )
    nh, n = attn.shape
    h, w, p, H, W = check_grid(n, dims, patch_size, image_size, "dinoseg")
    if isinstance(head, bool) or int(head) != head or not 0 <= int(head) < nh:
        raise ValueError(f"dinoseg: head must be an integer in [0, {nh - 1}] (the attention has {nh} heads), "
                         f"got {head!r}")
    if not 0 < float(mass) <= 1:
        raise ValueError(f"dinoseg: mass must be in (0, 1], got {mass!r}")
    a = attn[int(head)].detach().to(torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("dinoseg: cls_attn contains NaN or inf; check the backbone weights and the input")

    keep = attention_mass_mask(a, float(mass)).cpu().numpy().reshape(h, w)
    labels, count = scipy.ndimage.label(keep)
    if count == 0:
        return DinoSegResult(box=np.array([0.0, 0.0, float(W), float(H)]),
                             mask=np.ones((h, w), dtype=bool), score=0.0)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    mask = labels == (int(np.argmax(sizes)) + 1)
    a_np = a.cpu().numpy().astype(np.float64).reshape(h, w)
    score = float(np.clip(a_np[mask].sum() / a_np.sum(), 0.0, 1.0))
    return DinoSegResult(box=grid_mask_box(mask, p, (H, W)), mask=mask, score=score)
