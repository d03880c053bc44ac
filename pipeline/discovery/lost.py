"""LOST (Siméoni et al., BMVC 2021): seed selection, seed expansion and box, on one image.

Features in, result out; no I/O. Numerics follow the reference LOST code (docs/ARCHITECTURE.md,
"Exactness"); the one deliberate deviation is the stable tie-break of the degree order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch


@dataclass
class LostResult:
    """Everything LOST computes for one image (CPU numpy; patch indices are row-major).

    ``score`` is ``1 - degree[seed] / (N - 1)`` (1.0 when N == 1) in [0, 1]: the fraction of the
    other patches *not* positively correlated with the seed. Higher means a more distinctive seed;
    it is 0.0 in the degenerate fallback (see :func:`lost`).
    """

    box: np.ndarray
    seed: int
    degree: np.ndarray
    potentials: np.ndarray
    similars: np.ndarray
    map: np.ndarray
    mask: np.ndarray
    score: float


def check_positive_int(what: str, key: str, value) -> None:
    """Raise ValueError naming ``what`` and ``key`` unless ``value`` is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what}: {key} must be a positive integer, got {value!r}")


def check_grid(n: int, dims, patch_size, image_size, what: str) -> tuple[int, int, int, int, int]:
    """Validate grid arguments; return ``(h, w, patch_size, H, W)`` as ints or raise ValueError."""
    try:
        h, w = (int(d) for d in dims)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: dims must be a pair (h, w) of patch-grid sizes, got {dims!r}") from None
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(
            f"{what}: dims {(h, w)} give {h * w} patches but the input has {n}; pass dims=(h, w) of the "
            "patch grid (rows first) matching the features with the CLS token dropped"
        )
    check_positive_int(what, "patch_size", patch_size)
    try:
        H, W = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: image_size must be a pair (H, W), got {image_size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"{what}: image_size must be positive (H, W), got {(H, W)}")
    return h, w, int(patch_size), H, W


def grid_mask_box(mask: np.ndarray, patch_size: int, image_size: tuple[int, int]) -> np.ndarray:
    """Box ``[xmin, ymin, xmax + 1, ymax + 1] * patch_size`` of a non-empty (h, w) boolean grid mask,
    x2/y2 clipped to the unpadded image ``(H, W)``; float64 xyxy pixels, x2/y2 exclusive."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("grid_mask_box: the mask is empty, there is no box to take")
    H, W = image_size
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64) * patch_size
    box[2] = min(box[2], W)
    box[3] = min(box[3], H)
    return box


def as_feats(feats, what: str) -> torch.Tensor:
    """(N, D) float32 tensor from a tensor / array (a leading batch of 1 accepted); ValueError otherwise."""
    if not isinstance(feats, torch.Tensor):
        feats = torch.as_tensor(np.asarray(feats))
    if feats.dim() == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.dim() != 2 or feats.shape[0] < 1 or feats.shape[1] < 1:
        raise ValueError(
            f"{what}: feats must be (N, D) patch features (CLS dropped), got shape {tuple(feats.shape)}; "
            "for a batch pass one image at a time, e.g. feature_output.feats[0]"
        )
    feats = feats.detach().to(torch.float32)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{what}: feats contain NaN or inf; check the backbone weights and the input image")
    return feats


def lost(feats: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
         k_patches: int = 100) -> LostResult:
    """Run LOST on the patch features of one image.

    ``feats``: (N, D) (a leading batch of 1 is accepted), N = h * w patches row-major, CLS dropped;
    ``dims = (h, w)``; ``image_size = (H, W)`` of the unpadded image. CPU or CUDA tensors.

    ``A = F Fᵀ`` in float32. Degree = number of ``> 0`` entries of a row of A, diagonal excluded.
    Patches are ordered by degree ascending with a *stable* sort, so ties go to the lowest patch
    index (deviation: the reference uses torch's unstable argsort, whose tie order differs between
    CPU and GPU). Seed = first patch; potentials = first ``k_patches``; similars = potentials with
    ``A[seed, p] > 0``; map = sum of the raw rows ``A[similars]``; mask = the 4-connected component
    of ``map > 0`` holding the seed; box = its patch extent in pixels, clipped to (W, H).

    Fallback: if the seed's feature is all zero (then ``A[seed] == 0``, no similars, empty map) or
    the map is not positive at the seed, the box is the whole image ``[0, 0, W, H]``, the mask is
    all True and the score 0.0 (the reference ends up with the same whole-image box in that case).
    """
    F = as_feats(feats, "lost")
    n = F.shape[0]
    h, w, p, H, W = check_grid(n, dims, patch_size, image_size, "lost")
    check_positive_int("lost", "k_patches", k_patches)

    A = F @ F.T
    positive = A > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1)
    order = torch.sort(degree, stable=True).indices
    seed = int(order[0])
    potentials = order[: int(k_patches)]
    similars = potentials[A[seed, potentials] > 0]
    heat = A[similars].sum(dim=0)

    return finish_lost(seed, degree.cpu().numpy(), potentials.cpu().numpy(), similars.cpu().numpy(),
                       heat.cpu().numpy(), h, w, p, H, W)


def finish_lost(seed: int, degree: np.ndarray, potentials: np.ndarray, similars: np.ndarray,
                heat: np.ndarray, h: int, w: int, p: int, H: int, W: int) -> LostResult:
    """The CPU end of LOST for one image (connected component, box, score, fallback) from the device
    results moved to host arrays; shared by :func:`lost` and the batched ``lost_batch``."""
    n = h * w
    degree_np = degree.astype(np.int64)
    heat_np = heat.reshape(h, w)
    sy, sx = divmod(seed, w)
    if len(similars) == 0 or not heat_np[sy, sx] > 0:
        mask = np.ones((h, w), dtype=bool)
        box = np.array([0.0, 0.0, float(W), float(H)])
        score = 0.0
    else:
        labels, _ = scipy.ndimage.label(heat_np > 0)
        mask = labels == labels[sy, sx]
        box = grid_mask_box(mask, p, (H, W))
        score = 1.0 - float(degree_np[seed]) / (n - 1) if n > 1 else 1.0
    return LostResult(
        box=box,
        seed=seed,
        degree=degree_np,
        potentials=potentials.astype(np.int64),
        similars=similars.astype(np.int64),
        map=heat_np,
        mask=mask,
        score=score,
    )
