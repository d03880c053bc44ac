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

Solvers: ``solver="scipy"`` (default) is the exact path; ``"torch"`` solves each stage's graph with
:func:`~pipeline.discovery.cut_solver.solve_cut_torch` on the features' device (see TokenCut's "Solvers"), and
:func:`maskcut_batch` runs several same-size images stage by stage (:class:`MaskCutRun`), stage ``t`` of every
image still going solved as one batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.discovery.cut_solver import check_solver, graph_cuts
from pipeline.discovery.lost import as_feats, check_grid, check_positive_int, grid_mask_box
from pipeline.discovery.tokencut import (CutResult, check_graph_params, fallback_result, graph_cut, orient,
                                         seed_component)

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
            num_objects: int = 3, tau: float = 0.15, eps: float = 1e-5, solver: str = "scipy") -> CutResult:
    """Run MaskCut (no CRF) on the patch features of one image; see the module docstring for each step.

    ``feats``: (N, D) last-block features (keys by default), N = h * w row-major, CLS dropped, a leading
    batch of 1 accepted; ``dims = (h, w)``; ``image_size = (H, W)`` of the unpadded image. Returns up to
    ``num_objects`` boxes in discovery order with their scores, stored masks and seeds; ``seed``,
    ``eigvec``, ``bipartition`` and ``eigvals`` are those of the first cut. ``solver``: ``"scipy"``
    (default, the exact path) or ``"torch"`` (the fast solve on the features' device, see
    :mod:`pipeline.discovery.cut_solver`); :func:`maskcut_batch` runs several images' stages together.
    """
    F = as_feats(feats, "maskcut")
    run = MaskCutRun(F, dims, patch_size, image_size, num_objects, tau, eps, solver)
    while not run.done:
        run.step(graph_cut(run.stage_feats(), run.tau, run.eps, solver))
    return run.result


class MaskCutRun:
    """One image's MaskCut, one stage at a time, so that several images' stages can be solved together:
    ``stage_feats()`` gives the features of the next stage's graph (the found patches zeroed), ``step(cut)``
    takes that graph's cut (``graph_cut`` of them) and advances; ``done`` and then ``result`` when finished."""

    def __init__(self, F: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
                 num_objects: int = 3, tau: float = 0.15, eps: float = 1e-5, solver: str = "scipy") -> None:
        n = F.shape[0]
        self.F, self.n = F, n
        self.h, self.w, self.p, self.H, self.W = check_grid(n, dims, patch_size, image_size, "maskcut")
        self.tau, self.eps = check_graph_params(tau, eps, "maskcut")
        check_positive_int("maskcut", "num_objects", num_objects)
        check_solver(solver, "maskcut")
        self.num_objects = int(num_objects)
        self.painted = np.zeros((self.h, self.w), dtype=bool)  # union of the masks found so far
        self.previous = None
        self.boxes, self.scores, self.masks, self.seeds = [], [], [], []
        self.first = None  # (seed, eigvec, bipartition, eigvals) of stage 0
        self.t = 0
        self.done = False
        self.result: CutResult | None = None

    def stage_feats(self) -> torch.Tensor:
        """Stage ``t``'s features: ``F`` with the patches of every earlier object set to zero."""
        if self.t == 0:
            keep = torch.ones(self.n, 1, dtype=torch.float32, device=self.F.device)
        else:
            keep = torch.from_numpy((~self.painted).reshape(self.n, 1).astype(np.float32)).to(self.F.device)
        return self.F * keep

    def step(self, cut) -> None:
        h, w, n, t = self.h, self.w, self.n, self.t
        if cut.v is None:
            if t == 0:
                self.result = fallback_result(h, w, self.H, self.W, cut.eigvals)
                self.result.stop = "degenerate"
                self.done = True
                return
            return self._finish("degenerate")
        v, bipartition, seed = orient_maskcut(cut.v, h, w)
        mask = seed_component(bipartition, seed)
        if t == 0:
            self.first = (seed, v.reshape(h, w).copy(), bipartition, cut.eigvals)
        else:
            if mask_iou(self.previous, mask) > MAX_IOU_WITH_PREVIOUS:
                return self._finish("overlap")
            if mask.sum() / n <= MIN_AREA_FRACTION:
                return self._finish("small")
        stored = mask & ~self.painted
        if not stored.any():
            return self._finish("empty")
        self.boxes.append(grid_mask_box(stored, self.p, (self.H, self.W)))
        self.scores.append(cut.score)
        self.masks.append(stored)
        self.seeds.append(seed)
        self.painted |= mask
        self.previous = mask
        self.t += 1
        if self.t == self.num_objects:
            self._finish("num_objects")

    def _finish(self, stop: str) -> None:
        seed0, eigvec0, bip0, eigvals0 = self.first
        self.result = CutResult(boxes=self.boxes, scores=self.scores, seed=seed0, eigvec=eigvec0,
                                bipartition=bip0, masks=self.masks, seeds=self.seeds, eigvals=eigvals0,
                                degenerate=False, stop=stop)
        self.done = True


def maskcut_batch(feats: torch.Tensor, dims: tuple[int, int], patch_size: int,
                  image_sizes: Sequence[tuple[int, int]], num_objects: int = 3, tau: float = 0.15,
                  eps: float = 1e-5, solver: str = "torch") -> list[CutResult]:
    """MaskCut on ``B`` images of one patch grid (``feats`` (B, N, D)), stage by stage: stage ``t`` of every
    image still running is one batch of graphs (``binary_graph_torch``, one ``F Fᵀ`` per image) solved
    together by :func:`~pipeline.discovery.cut_solver.solve_cut_torch` on the features' device
    (:func:`~pipeline.discovery.cut_solver.graph_cuts`: in chunks that bound the graphs' memory).
    ``solver="scipy"`` solves the same graphs one at a time with the exact path. Each result is what
    :func:`maskcut` gives for that image (with ``"torch"``: on a CPU; on a GPU, up to the rounding of batched
    products)."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 3:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"maskcut_batch: feats must be (B, N, D) patch features of same-size images, got {shape}")
    if len(image_sizes) != feats.shape[0]:
        raise ValueError(f"maskcut_batch: {feats.shape[0]} feature maps but {len(image_sizes)} image sizes")
    runs = [MaskCutRun(as_feats(f, "maskcut"), dims, patch_size, size, num_objects, tau, eps, solver)
            for f, size in zip(feats, image_sizes)]
    while True:
        active = [r for r in runs if not r.done]
        if not active:
            break
        cuts = graph_cuts(torch.stack([r.stage_feats() for r in active]), active[0].tau, active[0].eps, solver)
        for r, cut in zip(active, cuts):
            r.step(cut)
    return [r.result for r in runs]
