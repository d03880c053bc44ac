"""MaskCut (CutLER, Wang et al., CVPR 2023, section 3.2) without the CRF: up to ``num_objects`` cuts.

Features in, result out; no I/O. Written from the paper; the rules that the paper leaves open were
read off the authors' implementation (``maskcut/maskcut.py``, ``maskcut_forward``) and re-implemented
here. Each stage ``t = 0, 1, ...``:

1. Features of every patch found in earlier stages are set to zero (the paper's masked similarity:
   their normalized features are 0, so all their edges get weight ``eps``, diagonal included; they stay
   in the graph as weakly connected nodes, as in the implementation, which zeroes features rather than
   deleting nodes).
2. Same graph and solve as TokenCut (:mod:`pipeline.discovery.tokencut`): binary ``W`` (1 where the
   float32 cosine ``> tau``, else ``eps``), second-smallest eigenvector ``v`` of
   ``(D - W) x = λ D x`` via ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])``.
3. ``bipartition = v > sum(v) / N``. Foreground side (:func:`orient_maskcut`): the side holding the
   patch of maximum ``|v|`` (first on ties), as in TokenCut; reversed (``v = -v``,
   ``bipartition = logical_not(bipartition)``) when that side holds 3 or 4 of the 4 grid corners
   (object-centric prior: the foreground holds at most 2 corners). The seed is then ``argmax v`` of the
   oriented ``v`` (MaskCut recomputes it after orienting; TokenCut keeps ``argmax |v|``); it is always
   in the foreground. Deviation: the implementation applies the corner check to the raw ``v > mean``
   side *before* the seed rule (reverse if it has >= 3 corners, else take the seed's side). That equals
   the rule here whenever the raw side holds the seed, but when it does not and the seed's side holds
   >= 3 corners, the implementation keeps that corner-heavy side, while with the opposite eigenvector
   sign (which LAPACK is free to return) it would reverse it: its choice depends on the arbitrary sign.
   Here the prior is applied to the seed's side, so the result is sign-independent and matches the
   implementation's result for the sign whose ``v > mean`` side holds the seed.
4. Object mask = 4-connected component (scipy.ndimage.label default) of the foreground holding the seed.
5. Rejection (implementation's rule, stages ``t >= 1``): the mask is rejected when its IoU with the
   previous stage's mask is ``> 0.5`` or it covers ``<= 1 %`` of the patches.
6. Stored object = mask minus all earlier objects' patches (the implementation subtracts earlier
   masks); box = its patch extent in pixels clipped to the unpadded image (``grid_mask_box``).

Stop rule (what the code does, made explicit): the loop ends early at the first stage whose cut is
degenerate (fewer than 3 patches or no eigengap, e.g. every remaining feature zeroed or equal;
``stop = "degenerate"``), whose mask is rejected (step 5; ``"overlap"`` or ``"small"``), or whose
stored object is empty (``"empty"``); ``stop = "num_objects"`` when all stages ran.

Deviation: the implementation does not stop. It stores an empty mask for a rejected stage and goes on
with the *unchanged* graph (a rejected mask is not masked out), so the next stage recomputes the same
cut: after a ``<= 1 %`` rejection it rejects it again; after an IoU rejection it compares it with the
empty mask (IoU 0/0 = NaN, not > 0.5), accepts it, and keeps its part outside the earlier objects when
that is not empty (a near-duplicate's remainder; empty in the usual case where the cut re-finds a
zeroed object). Stopping keeps the rule's evident intent (no duplicates) and saves the repeated
solves. Empty stored masks are dropped (the implementation drops them when writing annotations,
area < 1).

Other choices where paper and code are silent or ambiguous:

* ``tau`` default 0.15: the value in the authors' documented pseudo-mask command (``--tau 0.15``; the
  script's argparse default is 0.2; the paper's own text was not at hand to check). ``eps`` 1e-5 as in
  the code.
* The CRF refinement and the "drop if the CRF mask has IoU < 0.5 with the cut" filter are not done;
  boxes are patch-level. Masks at patch resolution (the implementation upsamples to pixels with
  nearest interpolation before subtracting, which is the same at patch level).
* The corner check uses the grid's four corner patches, for any (h, w) (the implementation assumes
  a square grid when zeroing features).
* Scores: ``clip(1 - λ₂, 0, 1)`` of each stage's cut, as TokenCut's (see there); the paper ranks by
  discovery order, and so do ``boxes`` here.
* Stage 0 degenerate: whole-image fallback of TokenCut (one box, score 0.0, ``degenerate = True``).

Determinism: as TokenCut (see :mod:`pipeline.discovery.tokencut`); BLAS threads are pinned the same way.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.discovery.lost import as_feats, check_grid, check_positive_int, grid_mask_box
from pipeline.discovery.tokencut import (CutResult, binary_graph, check_graph_params,
                                         fallback_result, orient, seed_component, solve_cut)

# the implementation's rejection thresholds (step 5)
MAX_IOU_WITH_PREVIOUS = 0.5
MIN_AREA_FRACTION = 0.01


def count_corners(bipartition: np.ndarray) -> int:
    """Number of the four corner patches of an (h, w) bool grid that are True (a corner counted once
    per corner position, so a 1-wide grid counts its end patches twice, as the implementation does)."""
    b = bipartition
    return int(b[0, 0]) + int(b[0, -1]) + int(b[-1, 0]) + int(b[-1, -1])


def orient_maskcut(v: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """MaskCut's foreground choice on an eigenvector ``v`` (N,): ``(v, bipartition (h, w), seed)``.

    TokenCut's :func:`~pipeline.discovery.tokencut.orient` first (the side holding ``argmax |v|``);
    if that side holds 3 or 4 grid corners it is reversed again (``v`` negated, logical_not); the seed
    is then ``argmax v`` of the oriented ``v`` (first on ties), always inside the bipartition.
    """
    v, bipartition, _ = orient(v)
    bipartition = bipartition.reshape(h, w)
    if count_corners(bipartition) >= 3:
        v = -v
        bipartition = np.logical_not(bipartition)
    return v, bipartition, int(np.argmax(v))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; NaN when both are empty (0/0, as the implementation's torch IoU)."""
    union = int(np.logical_or(a, b).sum())
    inter = int(np.logical_and(a, b).sum())
    return float("nan") if union == 0 else inter / union


def maskcut(feats: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
            num_objects: int = 3, tau: float = 0.15, eps: float = 1e-5) -> CutResult:
    """Run MaskCut (no CRF) on the patch features of one image; see the module docstring for each step.

    ``feats``: (N, D) last-block features (keys by default), N = h * w row-major, CLS dropped, a leading
    batch of 1 accepted; ``dims = (h, w)``; ``image_size = (H, W)`` of the unpadded image. Returns up to
    ``num_objects`` boxes in discovery order with their scores, stored masks and seeds; ``seed``,
    ``eigvec``, ``bipartition`` and ``eigvals`` are those of the first cut.
    """
    F = as_feats(feats, "maskcut")
    n = F.shape[0]
    h, w, p, H, W = check_grid(n, dims, patch_size, image_size, "maskcut")
    tau, eps = check_graph_params(tau, eps, "maskcut")
    check_positive_int("maskcut", "num_objects", num_objects)

    painted = np.zeros((h, w), dtype=bool)  # union of the masks found so far
    keep = torch.ones(n, 1, dtype=torch.float32, device=F.device)
    previous = None
    boxes, scores, masks, seeds = [], [], [], []
    first = None  # (seed, eigvec, bipartition, eigvals) of stage 0
    stop = "num_objects"
    for t in range(int(num_objects)):
        if t > 0:
            keep = torch.from_numpy((~painted).reshape(n, 1).astype(np.float32)).to(F.device)
        cut = solve_cut(binary_graph(F * keep, tau, eps))
        if cut.v is None:
            if t == 0:
                res = fallback_result(h, w, H, W, cut.eigvals)
                res.stop = "degenerate"
                return res
            stop = "degenerate"
            break
        v, bipartition, seed = orient_maskcut(cut.v, h, w)
        mask = seed_component(bipartition, seed)
        if t == 0:
            first = (seed, v.reshape(h, w).copy(), bipartition, cut.eigvals)
        else:
            if mask_iou(previous, mask) > MAX_IOU_WITH_PREVIOUS:
                stop = "overlap"
                break
            if mask.sum() / n <= MIN_AREA_FRACTION:
                stop = "small"
                break
        stored = mask & ~painted
        if not stored.any():
            stop = "empty"
            break
        boxes.append(grid_mask_box(stored, p, (H, W)))
        scores.append(cut.score)
        masks.append(stored)
        seeds.append(seed)
        painted |= mask
        previous = mask
    seed0, eigvec0, bip0, eigvals0 = first
    return CutResult(boxes=boxes, scores=scores, seed=seed0, eigvec=eigvec0, bipartition=bip0, masks=masks,
                     seeds=seeds, eigvals=eigvals0, degenerate=False, stop=stop)
